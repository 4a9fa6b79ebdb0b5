// libFuzzer target for the GGUF parser. Build with
//   cmake -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang -DMORPHSERVE_FUZZ=ON
//   cmake --build build-fuzz --target gguf_fuzz
//   build-fuzz/bin/gguf_fuzz -max_total_time=60 ../shared/fixtures/tokenizer/
#include <cstddef>
#include <cstdint>
#include <span>

#include "engine/gguf/gguf_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = morphserve::engine::GgufFile::Parse(std::span<const uint8_t>(data, size));
  if (file.ok()) {
    // Touch everything the parser promised is in bounds.
    volatile uint8_t sink = 0;
    for (const auto& t : (*file)->tensors()) {
      if (t.size_bytes > 0) sink = sink ^ t.data[0] ^ t.data[t.size_bytes - 1];
    }
    for (const auto& [key, value] : (*file)->metadata()) {
      for (std::string_view s : value.strings) {
        if (!s.empty()) sink = sink ^ static_cast<uint8_t>(s.back());
      }
    }
  }
  return 0;
}
