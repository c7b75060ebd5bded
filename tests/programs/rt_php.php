<?php
// PHP (CLI): arrays, string functions, preg, closures, an exception caught after the
// restore, and short sleeps, for about 0.6 s.
echo "READY\n";
$count = [];
$words = [];
$n = 0;
$next = function () { static $c = 0; return $c++; };
for ($i = 0; $i < 200; $i++) {
    $line = sprintf("item-%04d:%s", $i, implode(",", array_map(fn($k) => $k * $i % 97, range(1, 8))));
    preg_match_all('/\d+/', $line, $m);
    foreach ($m[0] as $d) { $count[intval($d) % 13] = ($count[intval($d) % 13] ?? 0) + 1; }
    $words[] = explode(":", $line)[0];
    $n += $next();
    usleep(3000);
}
arsort($count);
try {
    throw new RuntimeException("after the restore");
} catch (RuntimeException $e) {
    $caught = $e->getMessage();
}
printf("n %d words %d last %s top %s caught %s\n", $n, count($words), end($words), json_encode(array_slice($count, 0, 3, true)), $caught);
