// A Java program with a thread pool: java JavaPool OUT READY GO [CHILD_STEPS]
// Four pool threads compute tasks the main thread submits and waits for, one every 20 ms
// (the JVM adds its own threads: JIT compilers, garbage collector, signal dispatcher).
// READY appears after the first task. After the last the program waits until GO exists,
// then writes OUT: every result and their running sum.
// With CHILD_STEPS, it first starts cat and a thread that writes it CHILD_STEPS numbers, one
// every 20 ms, through a pipe, and closes that pipe once GO exists; after the tasks the main
// thread reads cat's copy through another pipe, then waits for its exit status (by its pid:
// the JDK's reaper thread).
import java.io.*;
import java.nio.file.*;
import java.util.*;
import java.util.concurrent.*;

public class JavaPool {
    public static void main(String[] args) throws Exception {
        Path out = Paths.get(args[0]), ready = Paths.get(args[1]), go = Paths.get(args[2]);
        int childSteps = args.length > 3 ? Integer.parseInt(args[3]) : 0;
        List<String> lines = new ArrayList<>();
        Process child = childSteps == 0 ? null : new ProcessBuilder("cat").start();
        if (child != null) {
            Thread writer = new Thread(() -> {
                try (PrintWriter w = new PrintWriter(child.getOutputStream(), true)) {
                    for (int i = 0; i < childSteps; i++) {
                        w.println(i);
                        Thread.sleep(20);
                    }
                    while (!Files.exists(go)) Thread.sleep(10);
                } catch (InterruptedException e) {
                    throw new RuntimeException(e);
                }
            });
            writer.start();
        }
        ExecutorService pool = Executors.newFixedThreadPool(4);
        long sum = 0;
        for (int i = 0; i < 50; i++) {
            final int n = i;
            Future<Long> f = pool.submit(() -> {
                long s = n;
                for (int k = 0; k < 2_000_000; k++) s = (s * 31 + k + n) % 1_000_003;
                return s;
            });
            long v = f.get();
            sum = (sum * 7 + v) % 1_000_000_007L;
            lines.add("task " + n + " " + v + " " + sum);
            if (i == 0) Files.createFile(ready);
            Thread.sleep(20);
        }
        pool.shutdown();
        if (child != null) {
            BufferedReader r = new BufferedReader(new InputStreamReader(child.getInputStream()));
            long acc = 0;
            for (String line; (line = r.readLine()) != null; ) acc = (acc * 31 + Long.parseLong(line)) % 1_000_003;
            lines.add("child said " + acc + " and exited " + child.waitFor());
        }
        while (!Files.exists(go)) Thread.sleep(10);
        Files.write(out, lines);
    }
}
