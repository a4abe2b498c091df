"""psycopg2: transactions, SQL-level PREPARE/EXECUTE/DEALLOCATE inside them, COPY, cancel."""
import os, threading, time
import psycopg2

t = os.environ["DRIVER_TABLE"]
conn = psycopg2.connect("")
cur = conn.cursor()
cur.execute(f"DROP TABLE IF EXISTS {t}")
cur.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
conn.commit()
cur.execute(f"PREPARE ins (int, text) AS INSERT INTO {t} VALUES ($1, $2)")
for i in range(1, 4):
    cur.execute("EXECUTE ins (%s, %s)", (i, f"v{i}"))
cur.execute("DEALLOCATE ins")
conn.commit()
cur.execute(f"SELECT count(*) FROM {t}")
print("rows", cur.fetchone()[0])
try:
    cur.execute(f"INSERT INTO {t} VALUES (1, 'dup')")
except psycopg2.Error as e:
    print("error", e.pgcode)
    conn.rollback()
import io
cur.copy_expert(f"COPY {t} (id, v) FROM STDIN", io.StringIO("10\tc10\n11\tc11\n"))
conn.commit()
out = io.StringIO()
cur.copy_expert(f"COPY (SELECT id, v FROM {t} ORDER BY id) TO STDOUT", out)
print("copied", out.getvalue().split("\n"))
def cancel_soon():
    time.sleep(0.3)
    conn.cancel()
threading.Thread(target=cancel_soon).start()
try:
    cur.execute("SELECT pg_sleep(10)")
except psycopg2.Error as e:
    print("cancel", e.pgcode)
    conn.rollback()
cur.execute(f"DROP TABLE {t}")
conn.commit()
