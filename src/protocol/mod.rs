//! The PostgreSQL v3 wire protocol as the proxy needs it: framing, startup packets, the few typed
//! views the proxy looks inside, and encoders for the messages it writes itself.
//!
//! Frontend (client → server) and backend (server → client) messages live in separate modules
//! because their tags overlap (`S` is Sync one way and ParameterStatus the other).

pub mod backend;
pub mod codec;
pub mod frontend;
pub mod reader;
pub mod sqlstate;
pub mod startup;

pub use codec::{Frame, FrameCodec, ProtocolError};
pub use reader::MessageReader;
