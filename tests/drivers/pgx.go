// pgx (v4, Debian's golang-github-jackc-pgx-v4-dev): statements prepared and cached by the
// driver, a transaction with a batch, prepare -> DDL -> execute, COPY in, an error, cancel.
// Prints what it sees, one line each.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
)

func state(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	if err != nil {
		return "other: " + err.Error()
	}
	return "none"
}

func main() {
	ctx := context.Background()
	t := os.Getenv("DRIVER_TABLE")
	url := fmt.Sprintf("postgres://%s:%s@%s:%s/%s?sslmode=disable", os.Getenv("PGUSER"),
		os.Getenv("PGPASSWORD"), os.Getenv("PGHOST"), os.Getenv("PGPORT"), os.Getenv("PGDATABASE"))
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	defer conn.Close(ctx)
	must := func(err error) {
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	_, err = conn.Exec(ctx, "DROP TABLE IF EXISTS "+t)
	must(err)
	_, err = conn.Exec(ctx, "CREATE TABLE "+t+" (id int PRIMARY KEY, v text)")
	must(err)

	// A transaction with a batch of cached prepared statements.
	tx, err := conn.Begin(ctx)
	must(err)
	batch := &pgx.Batch{}
	for i := 1; i <= 5; i++ {
		batch.Queue("INSERT INTO "+t+" VALUES ($1, $2)", i, fmt.Sprintf("v%d", i))
	}
	must(tx.SendBatch(ctx, batch).Close())
	must(tx.Commit(ctx))
	var n int
	must(conn.QueryRow(ctx, "SELECT count(*) FROM "+t).Scan(&n))
	fmt.Println("rows", n)

	// A cached statement, then the table changes shape.
	q := "SELECT * FROM " + t + " WHERE id = $1"
	show := func(label string) {
		rows, err := conn.Query(ctx, q, 1)
		if err != nil {
			fmt.Println(label, "error", state(err))
			return
		}
		for rows.Next() {
			vals, _ := rows.Values()
			fmt.Println(label, vals, len(rows.FieldDescriptions()), "columns")
		}
		if rows.Err() != nil {
			fmt.Println(label, "error", state(rows.Err()))
		}
		rows.Close()
	}
	show("before")
	show("before")
	_, err = conn.Exec(ctx, "ALTER TABLE "+t+" ADD COLUMN extra int")
	must(err)
	show("after")
	show("again")

	// An error inside a transaction, then a rollback.
	tx, err = conn.Begin(ctx)
	must(err)
	_, err = tx.Exec(ctx, "INSERT INTO "+t+" (id, v) VALUES ($1, $2)", 1, "dup")
	fmt.Println("error", state(err))
	must(tx.Rollback(ctx))

	copied, err := conn.CopyFrom(ctx, pgx.Identifier{t}, []string{"id", "v"},
		pgx.CopyFromRows([][]interface{}{{10, "c10"}, {11, "c11"}, {12, "c12"}}))
	must(err)
	fmt.Println("copied", copied)

	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = conn.Exec(cctx, "SELECT pg_sleep(10)")
	cancel()
	fmt.Println("cancel", err != nil)
	// pgx closes the connection when a context ends a query: open another.
	conn2, err := pgx.Connect(ctx, url)
	must(err)
	defer conn2.Close(ctx)
	must(conn2.QueryRow(ctx, "SELECT count(*) FROM "+t+" WHERE id >= 10").Scan(&n))
	fmt.Println("alive", n)
	_, err = conn2.Exec(ctx, "DROP TABLE "+t)
	must(err)
}
