"""psycopg 3: transactions with prepared statements, prepare -> DDL -> execute, pipeline
mode (with an error inside), COPY both ways, cancel. Prints what it sees, one line each."""
import os, threading, time
import psycopg

t = os.environ["DRIVER_TABLE"]
conn = psycopg.connect(prepare_threshold=0)
conn.autocommit = True
conn.execute(f"DROP TABLE IF EXISTS {t}")
conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")

with conn.transaction():
    for i in range(1, 6):
        conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, f"v{i}"), prepare=True)
print("rows", conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])

# A statement prepared before the table changes shape.
q = f"SELECT * FROM {t} WHERE id = %s"
print("before", conn.execute(q, (1,), prepare=True).fetchone())
conn.execute(f"ALTER TABLE {t} ADD COLUMN extra int")
try:
    print("after", conn.execute(q, (1,), prepare=True).fetchone())
except psycopg.Error as e:
    print("after error", e.sqlstate)
try:
    print("again", conn.execute(q, (1,), prepare=True).fetchone())
except psycopg.Error as e:
    print("again error", e.sqlstate)
print("unprepared", conn.execute(q, (1,), prepare=False).fetchone())

with conn.pipeline():
    c1 = conn.execute(f"SELECT v FROM {t} WHERE id = %s", (2,))
    c2 = conn.execute(f"UPDATE {t} SET v = 'p' WHERE id = %s", (3,))
    c3 = conn.execute(f"SELECT count(*) FROM {t}")
print("pipeline", c1.fetchone(), c2.rowcount, c3.fetchone())
try:
    with conn.pipeline():
        conn.execute("SELECT 1/0")
        conn.execute(f"UPDATE {t} SET v = 'never' WHERE id = 1")
except psycopg.Error as e:
    print("pipeline error", e.sqlstate)
print("after pipeline", conn.execute(f"SELECT v FROM {t} WHERE id = 1").fetchone())

with conn.cursor() as cur:
    with cur.copy(f"COPY {t} (id, v) FROM STDIN") as copy:
        for i in range(10, 15):
            copy.write_row((i, f"c{i}"))
    with cur.copy(f"COPY (SELECT id, v FROM {t} WHERE id >= 10 ORDER BY id) TO STDOUT") as copy:
        print("copied", [row for row in copy.rows()])

def cancel_soon():
    time.sleep(0.3)
    conn.cancel()
threading.Thread(target=cancel_soon).start()
try:
    conn.execute("SELECT pg_sleep(10)")
except psycopg.Error as e:
    print("cancel", e.sqlstate)
print("alive", conn.execute("SELECT 1").fetchone()[0])
conn.execute(f"DROP TABLE {t}")
