# Perl 5: hashes, regular expressions, sprintf, sort, a closure counter and sleeps with
# select, for about 0.6 s, then a summary line.
use strict;
use warnings;
$| = 1;
print "READY\n";
my %count;
my @words;
my $n = 0;
my $next = do { my $c = 0; sub { return $c++ } };
for my $i (0 .. 199) {
  my $line = sprintf("item-%04d:%s", $i, join(",", map { $_ * $i % 97 } 1 .. 8));
  while ($line =~ /(\d+)/g) { $count{$1 % 13}++; }
  push @words, (split /:/, $line)[0];
  $n += $next->();
  select(undef, undef, undef, 0.003);
}
my @top = (sort { $count{$b} <=> $count{$a} || $a <=> $b } keys %count)[0 .. 2];
printf "n %d words %d last %s top %s\n", $n, scalar(@words), $words[-1], join(" ", map { "$_=$count{$_}" } @top);
