# ruby-pg: named prepares and DEALLOCATE inside a transaction, pipeline mode, COPY, cancel.
require "pg"
t = ENV.fetch("DRIVER_TABLE")
c = PG.connect
c.exec("DROP TABLE IF EXISTS #{t}")
c.exec("CREATE TABLE #{t} (id int PRIMARY KEY, v text)")
c.transaction do
  c.prepare("ins", "INSERT INTO #{t} VALUES ($1, $2)")
  (1..3).each { |i| c.exec_prepared("ins", [i, "v#{i}"]) }
  c.exec("DEALLOCATE ins")
end
puts "rows #{c.exec("SELECT count(*) FROM #{t}").getvalue(0, 0)}"
c.prepare("sel", "SELECT * FROM #{t} WHERE id = $1")
puts "before #{c.exec_prepared("sel", [1]).values.inspect}"
c.exec("ALTER TABLE #{t} ADD COLUMN extra int")
begin
  puts "after #{c.exec_prepared("sel", [1]).values.inspect}"
rescue PG::Error => e
  puts "after error #{e.result&.error_field(PG::PG_DIAG_SQLSTATE)}"
end
c.enter_pipeline_mode
c.send_query_params("SELECT v FROM #{t} WHERE id = $1", [2])
c.send_query_params("SELECT 1/0", [])
c.pipeline_sync
r = c.get_result; puts "pipeline #{r.values.inspect}"; c.get_result
r = c.get_result; puts "pipeline #{r.result_status == PG::PGRES_FATAL_ERROR ? r.error_field(PG::PG_DIAG_SQLSTATE) : r.values.inspect}"; c.get_result
r = c.get_result; puts "pipeline sync #{r.result_status == PG::PGRES_PIPELINE_SYNC}"
c.exit_pipeline_mode
c.copy_data("COPY #{t} (id, v) FROM STDIN") { c.put_copy_data("10\tc10\n11\tc11\n") }
rows = []
c.copy_data("COPY (SELECT id, v FROM #{t} ORDER BY id) TO STDOUT") { while (row = c.get_copy_data); rows << row; end }
puts "copied #{rows.inspect}"
Thread.new { sleep 0.3; c.cancel }
begin
  c.exec("SELECT pg_sleep(10)")
rescue PG::Error => e
  puts "cancel #{e.result&.error_field(PG::PG_DIAG_SQLSTATE)}"
end
c.exec("DROP TABLE #{t}")
