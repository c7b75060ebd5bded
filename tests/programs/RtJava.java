// Java 17 on HotSpot: many threads (a pool, a scheduler), JIT-compiled code and the JVM's
// own signals and memory, across a checkpoint.
import java.util.*;
import java.util.concurrent.*;

public class RtJava {
  public static void main(String[] args) throws Exception {
    System.out.println("READY");
    ExecutorService pool = Executors.newFixedThreadPool(12);
    ScheduledExecutorService ticker = Executors.newScheduledThreadPool(2);
    final long[] ticks = {0};
    ticker.scheduleAtFixedRate(() -> { synchronized (ticks) { ticks[0]++; } }, 0, 5, TimeUnit.MILLISECONDS);
    long total = 0;
    Map<Integer, String> seen = new ConcurrentHashMap<>();
    for (int r = 0; r < 30; r++) {
      final int rr = r;
      List<Future<Long>> fs = new ArrayList<>();
      for (int t = 0; t < 12; t++) {
        final int tt = t;
        fs.add(pool.submit(() -> {
          long s = 0;
          for (int k = 0; k < 400_000; k++) s = (s + (long) k * (tt + rr)) % 1_000_003;
          seen.put(tt * 100 + rr % 7, Thread.currentThread().getName().substring(0, 4));
          return s;
        }));
      }
      for (Future<Long> f : fs) total = (total + f.get()) % 1_000_003;
      if (r % 10 == 0) System.out.println("round " + r);
      Thread.sleep(10);
    }
    pool.shutdown();
    ticker.shutdownNow();
    boolean ticked;
    synchronized (ticks) { ticked = ticks[0] > 10; }
    System.out.println("total " + total + " seen " + seen.size() + " ticked " + ticked);
  }
}
