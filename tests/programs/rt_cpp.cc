// C++: std::thread, std::mutex, std::condition_variable, iostreams, exceptions thrown after
// the restore.
#include <chrono>
#include <condition_variable>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

std::mutex m;
std::condition_variable cv;
int turn = 0;
long total = 0;
std::map<int, std::string> notes;

int main() {
  std::cout << "READY" << std::endl;
  std::vector<std::thread> ts;
  for (int id = 0; id < 4; id++)
    ts.emplace_back([id] {
      for (int i = 0; i < 150; i++) {
        std::unique_lock<std::mutex> l(m);
        cv.wait(l, [id] { return turn == id; });
        total += id * i;
        std::ostringstream os;
        os << id << ":" << i;
        notes[i % 17] = os.str();
        turn = (turn + 1) % 4;
        cv.notify_all();
        l.unlock();
        std::this_thread::sleep_for(std::chrono::milliseconds(3));
      }
    });
  for (auto &t : ts) t.join();
  int caught = 0;
  for (int k = 0; k < 3; k++) {
    try {
      if (k != 1) throw std::runtime_error("thrown after the restore");
      throw std::out_of_range("another");
    } catch (const std::out_of_range &e) {
      caught += 10;
    } catch (const std::exception &e) {
      caught += 1;
    }
  }
  std::cout << "total " << total << " notes " << notes.size() << " " << notes[3] << " caught " << caught << std::endl;
}
