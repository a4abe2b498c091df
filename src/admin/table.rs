//! A result set for the admin console: typed columns, text values, encoded as
//! RowDescription + DataRow* + CommandComplete.

use bytes::{BufMut, BytesMut};

use crate::protocol::backend::{self, ROW_DESCRIPTION};
use crate::protocol::codec::{put_cstr, write_message};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    Int4,
    Int8,
    Float8,
    Bool,
    Numeric,
}

impl Type {
    fn oid(self) -> i32 {
        match self {
            Type::Text => 25,
            Type::Int4 => 23,
            Type::Int8 => 20,
            Type::Float8 => 701,
            Type::Bool => 16,
            Type::Numeric => 1700,
        }
    }
}

pub struct Table {
    columns: Vec<(&'static str, Type)>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Type)]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn column_names(&self) -> Vec<&'static str> {
        self.columns.iter().map(|(n, _)| *n).collect()
    }

    /// Adds a row; values beyond the columns are dropped, missing ones are NULL.
    pub fn row(&mut self, values: Vec<Option<String>>) {
        let mut values = values;
        values.resize(self.columns.len(), None);
        self.rows.push(values);
    }

    pub fn encode(&self, out: &mut BytesMut, tag: &str) {
        write_message(out, ROW_DESCRIPTION, |b| {
            b.put_i16(self.columns.len() as i16);
            for (name, ty) in &self.columns {
                put_cstr(b, name);
                b.put_i32(0);
                b.put_i16(0);
                b.put_i32(ty.oid());
                b.put_i16(-1);
                b.put_i32(-1);
                b.put_i16(0);
            }
        });
        for row in &self.rows {
            let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
            backend::data_row(out, &values);
        }
        backend::command_complete(out, tag);
    }
}

/// Shorthands for building rows.
pub fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

pub fn opt<T: ToString>(v: Option<T>) -> Option<String> {
    v.map(|v| v.to_string())
}
