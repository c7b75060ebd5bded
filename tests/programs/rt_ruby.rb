# Ruby (MRI, with its timer thread and GVL): threads taking turns with a Mutex and a
# ConditionVariable, a Queue, hashes, string formatting, and an exception raised and
# rescued after the restore.
$stdout.sync = true
puts "READY"
m = Mutex.new
cv = ConditionVariable.new
turn = 0
total = 0
q = Queue.new
threads = (0...4).map do |id|
  Thread.new do
    150.times do |i|
      m.synchronize do
        cv.wait(m) until turn == id
        total += id * i
        turn = (turn + 1) % 4
        cv.broadcast
      end
      q << [id, i]
      sleep 0.003
    end
  end
end
threads.each(&:join)
seen = Hash.new(0)
seen[q.pop[0]] += 1 until q.empty?
caught = begin
  raise ArgumentError, "after the restore"
rescue ArgumentError => e
  e.message
end
puts format("total %d seen %s caught %s", total, seen.sort.inspect, caught)
