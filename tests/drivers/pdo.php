<?php
// PHP PDO with native prepares (its default): statements freed inside transactions send
// DEALLOCATE; prepare -> DDL -> execute; errors inside transactions. One line per result.
$t = getenv("DRIVER_TABLE");
$dsn = sprintf("pgsql:host=%s;port=%s;dbname=%s", getenv("PGHOST"), getenv("PGPORT"), getenv("PGDATABASE"));
$db = new PDO($dsn, getenv("PGUSER"), getenv("PGPASSWORD"), [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
$db->exec("DROP TABLE IF EXISTS $t");
$db->exec("CREATE TABLE $t (id int PRIMARY KEY, v text)");
for ($round = 0; $round < 3; $round++) {
    $db->beginTransaction();
    for ($i = 1; $i <= 3; $i++) {
        $st = $db->prepare("INSERT INTO $t VALUES (?, ?)");
        $st->execute([$round * 10 + $i, "v$i"]);
        $st = null; // DEALLOCATE inside the transaction
    }
    $db->commit();
}
echo "rows ", $db->query("SELECT count(*) FROM $t")->fetchColumn(), "\n";
$sel = $db->prepare("SELECT * FROM $t WHERE id = ?");
$sel->execute([1]);
echo "before ", json_encode($sel->fetch(PDO::FETCH_NUM)), "\n";
$db->exec("ALTER TABLE $t ADD COLUMN extra int");
try {
    $sel->execute([1]);
    echo "after ", json_encode($sel->fetch(PDO::FETCH_NUM)), "\n";
} catch (PDOException $e) {
    echo "after error ", $e->getCode(), "\n";
}
$sel = null;
$db->beginTransaction();
try {
    $db->exec("INSERT INTO $t VALUES (1, 'dup')");
} catch (PDOException $e) {
    echo "error ", $e->getCode(), "\n";
}
$db->rollBack();
$db->beginTransaction();
$st = $db->prepare("UPDATE $t SET v = 'u' WHERE id = ?");
$st->execute([2]);
$st = null;
$db->commit();
echo "updated ", $db->query("SELECT v FROM $t WHERE id = 2")->fetchColumn(), "\n";
$db->exec("DROP TABLE $t");
