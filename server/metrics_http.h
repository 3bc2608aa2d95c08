// A minimal HTTP/1.1 endpoint for Prometheus scrapes: GET /metrics answers the text exposition
// format, anything else 404; one request per connection, served on one thread.
//
// Why not prometheus-cpp's Exposer: it runs Debian's civetweb, whose worker threads get a fixed
// 100 KiB stack. glibc sizes each thread's static TLS out of that stack, and with the CUDA
// runtime linked in (plus OpenBLAS) the workers no longer start: scrapes get an empty reply.
#ifndef RAMBA_SERVER_METRICS_HTTP_H_
#define RAMBA_SERVER_METRICS_HTTP_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace ramba::server {

class MetricsHttpServer {
 public:
  // Listens on "HOST:PORT" (port 0: any free port) and answers GET /metrics with body().
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::function<std::string()> body);
  ~MetricsHttpServer();  // stops accepting and joins the thread

  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  void Serve();
  void Handle(int fd);

  int listen_fd_ = -1;
  int port_ = 0;
  std::function<std::string()> body_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace ramba::server

#endif  // RAMBA_SERVER_METRICS_HTTP_H_
