// MatMul throughput on the shapes of SmolLM2-135M (hidden 576, FFN 1536,
// vocabulary 49152), reported as weight bytes streamed per second.
//
// BM_MatMul reuses one weight matrix, which stays in cache where it fits;
// BM_MatMulCold cycles through copies totalling more than the last-level
// cache, as decoding a whole model does.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/thread_pool.h"
#include "kernels/cpu/matmul.h"

namespace morphserve::kernels {
namespace {

constexpr size_t kColdBytes = size_t{256} << 20;

// Random bytes with the bits of 0x3B only, which keeps every f16, bf16 and
// f32 field finite (and is quick to fill hundreds of megabytes with).
std::vector<uint8_t> RandomBytes(size_t n, std::mt19937_64& rng) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t r = rng() & 0x3B3B3B3B3B3B3B3Bull;
    std::memcpy(v.data() + i, &r, std::min<size_t>(8, n - i));
  }
  return v;
}

ThreadPool& Pool(int threads) {
  static ThreadPool one(1);
  static ThreadPool two(2);
  return threads == 1 ? one : two;
}

void RunMatMul(benchmark::State& state, bool cold) {
  const auto type = static_cast<DType>(state.range(0));
  const int64_t rows = state.range(1);
  const int64_t cols = state.range(2);
  const int64_t n_tokens = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  const bool packed = state.range(5) != 0;
  std::mt19937_64 rng(42);
  const size_t row_bytes = RowBytes(type, cols);
  const size_t matrix_bytes = row_bytes * static_cast<size_t>(rows);
  const size_t copies = cold ? kColdBytes / matrix_bytes + 1 : 1;
  std::vector<uint8_t> w = RandomBytes(matrix_bytes * copies, rng);
  if (packed) {
    // The packed layout has the bytes of the rows it holds (rows % 8 == 0 here).
    std::vector<uint8_t> rows_layout = w;
    for (size_t c = 0; c < copies; ++c) {
      PackWeights(type, rows_layout.data() + c * matrix_bytes, row_bytes, rows, cols,
                  w.data() + c * matrix_bytes);
    }
  }
  std::vector<float> x(static_cast<size_t>(n_tokens * cols));
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  std::vector<float> y(static_cast<size_t>(n_tokens * rows));
  std::vector<uint8_t> scratch(MatMulScratchBytes(type, cols, n_tokens));

  MatMulArgs args{.w_type = type,
                  .w = w.data(),
                  .w_row_bytes = row_bytes,
                  .rows = rows,
                  .cols = cols,
                  .x = x.data(),
                  .x_stride = cols,
                  .n_tokens = n_tokens,
                  .y = y.data(),
                  .y_stride = rows,
                  .w_layout = packed ? WeightLayout::kPacked : WeightLayout::kRows};
  size_t copy = 0;
  for (auto _ : state) {
    args.w = w.data() + copy * matrix_bytes;
    MatMul(args, scratch.data(), &Pool(threads));
    benchmark::DoNotOptimize(y.data());
    copy = copy + 1 == copies ? 0 : copy + 1;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * matrix_bytes));
  state.SetItemsProcessed(state.iterations() * rows * cols * n_tokens);  // multiply-adds
  state.SetLabel(std::string(DTypeName(type)) + (packed ? " packed" : ""));
}

void BM_MatMul(benchmark::State& state) { RunMatMul(state, /*cold=*/false); }
void BM_MatMulCold(benchmark::State& state) { RunMatMul(state, /*cold=*/true); }

constexpr DType kTypes[] = {DType::kQ4_0, DType::kQ4_1, DType::kQ8_0, DType::kQ4_K, DType::kQ6_K, DType::kF16};
constexpr int64_t kShapes[][2] = {{576, 576}, {1536, 576}, {576, 1536}, {49152, 576}};

void Args(benchmark::internal::Benchmark* b, std::initializer_list<int64_t> token_counts) {
  b->ArgNames({"type", "rows", "cols", "tokens", "threads", "packed"});
  for (DType type : kTypes) {
    for (const auto& shape : kShapes) {
      // K-quant rows hold whole super-blocks of 256: of these shapes only
      // 1536 columns qualify (GGUF files store such 576-wide tensors as Q8_0).
      if (shape[1] % GetDTypeInfo(type).block_elems != 0) continue;
      for (int64_t tokens : token_counts) {
        for (int64_t threads : {1, 2}) {
          for (int64_t packed : {0, 1}) {
            if (packed == 1 && !CanPackWeights(type)) continue;
            b->Args({static_cast<int64_t>(type), shape[0], shape[1], tokens, threads, packed});
          }
        }
      }
    }
  }
  b->UseRealTime();
}

BENCHMARK(BM_MatMul)->Apply([](benchmark::internal::Benchmark* b) { Args(b, {1, 64}); });
BENCHMARK(BM_MatMulCold)->Apply([](benchmark::internal::Benchmark* b) { Args(b, {1, 64}); });

}  // namespace
}  // namespace morphserve::kernels

BENCHMARK_MAIN();
