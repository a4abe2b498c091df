"""asyncpg: prepared statements everywhere, prepare -> DDL -> execute, transactions, COPY,
cancel through a timeout. Prints what it sees, one line each."""
import asyncio, os
import asyncpg

t = os.environ["DRIVER_TABLE"]

async def main():
    conn = await asyncpg.connect(host=os.environ["PGHOST"], port=int(os.environ["PGPORT"]),
        user=os.environ["PGUSER"], password=os.environ["PGPASSWORD"],
        database=os.environ["PGDATABASE"])
    await conn.execute(f"DROP TABLE IF EXISTS {t}")
    await conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
    async with conn.transaction():
        ins = await conn.prepare(f"INSERT INTO {t} VALUES ($1, $2)")
        for i in range(1, 6):
            await ins.fetch(i, f"v{i}")
    print("rows", await conn.fetchval(f"SELECT count(*) FROM {t}"))
    stmt = await conn.prepare(f"SELECT * FROM {t} WHERE id = $1")
    print("before", list(await stmt.fetchrow(1)))
    await conn.execute(f"ALTER TABLE {t} ADD COLUMN extra int")
    try:
        print("after", list(await stmt.fetchrow(1)))
    except asyncpg.PostgresError as e:
        print("after error", e.sqlstate)
    except asyncpg.InterfaceError as e:
        print("after interface error", type(e).__name__)
    print("fresh", list(await conn.fetchrow(f"SELECT * FROM {t} WHERE id = $1", 1)))
    try:
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {t} VALUES (100, 'x')")
            await conn.execute("SELECT 1/0")
    except asyncpg.PostgresError as e:
        print("rolled back", e.sqlstate, await conn.fetchval(f"SELECT count(*) FROM {t} WHERE id = 100"))
    await conn.copy_records_to_table(t, records=[(20, "c20"), (21, "c21")], columns=["id", "v"])
    print("copied", [tuple(r) for r in await conn.fetch(f"SELECT id, v FROM {t} WHERE id >= 20 ORDER BY id")])
    try:
        await conn.fetch("SELECT pg_sleep(10)", timeout=0.3)
    except asyncio.TimeoutError:
        print("timeout")
    print("alive", await conn.fetchval("SELECT 1"))
    await conn.execute(f"DROP TABLE {t}")
    await conn.close()

asyncio.run(main())
