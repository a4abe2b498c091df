// pgJDBC with server-side prepared statements from the first use (prepareThreshold=1):
// transactions, prepare -> DDL -> execute, batches, errors, cancel.
import java.sql.*;

public class Jdbc {
    public static void main(String[] args) throws Exception {
        String t = System.getenv("DRIVER_TABLE");
        String url = "jdbc:postgresql://" + System.getenv("PGHOST") + ":" + System.getenv("PGPORT")
            + "/" + System.getenv("PGDATABASE") + "?prepareThreshold=1";
        try (Connection c = DriverManager.getConnection(url, System.getenv("PGUSER"), System.getenv("PGPASSWORD"))) {
            try (Statement s = c.createStatement()) {
                s.execute("DROP TABLE IF EXISTS " + t);
                s.execute("CREATE TABLE " + t + " (id int PRIMARY KEY, v text)");
            }
            c.setAutoCommit(false);
            try (PreparedStatement p = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?)")) {
                for (int i = 1; i <= 5; i++) { p.setInt(1, i); p.setString(2, "v" + i); p.addBatch(); }
                p.executeBatch();
            }
            c.commit();
            c.setAutoCommit(true);
            System.out.println("rows " + one(c, "SELECT count(*) FROM " + t));
            try (PreparedStatement p = c.prepareStatement("SELECT * FROM " + t + " WHERE id = ?")) {
                for (int round = 0; round < 2; round++) { p.setInt(1, 1); show(p, "before"); }
                try (Statement s = c.createStatement()) { s.execute("ALTER TABLE " + t + " ADD COLUMN extra int"); }
                try { p.setInt(1, 1); show(p, "after"); }
                catch (SQLException e) { System.out.println("after error " + e.getSQLState()); }
            }
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.execute("INSERT INTO " + t + " VALUES (1, 'dup')");
            } catch (SQLException e) { System.out.println("error " + e.getSQLState()); }
            c.rollback();
            c.setAutoCommit(true);
            try (Statement s = c.createStatement()) {
                new Thread(() -> { try { Thread.sleep(300); s.cancel(); } catch (Exception e) {} }).start();
                s.execute("SELECT pg_sleep(10)");
            } catch (SQLException e) { System.out.println("cancel " + e.getSQLState()); }
            System.out.println("alive " + one(c, "SELECT 1"));
            try (Statement s = c.createStatement()) { s.execute("DROP TABLE " + t); }
        }
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(sql)) { r.next(); return r.getString(1); }
    }

    static void show(PreparedStatement p, String label) throws SQLException {
        try (ResultSet r = p.executeQuery()) {
            int n = r.getMetaData().getColumnCount();
            StringBuilder b = new StringBuilder(label);
            while (r.next()) for (int i = 1; i <= n; i++) b.append(' ').append(r.getString(i));
            System.out.println(b + " (" + n + " columns)");
        }
    }
}
