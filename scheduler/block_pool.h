// Bookkeeping of the paged KV pool's blocks: which ids are free. Metadata
// only; the memory itself belongs to the engine's KV cache. Not thread-safe:
// owned by the thread that schedules.
#ifndef MORPHSERVE_SCHEDULER_BLOCK_POOL_H_
#define MORPHSERVE_SCHEDULER_BLOCK_POOL_H_

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace morphserve::scheduler {

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_used() const { return num_blocks_ - num_free(); }

  // Takes `n` blocks and appends their ids to `table`; false (and nothing
  // taken) when fewer than `n` are free.
  bool Allocate(int32_t n, std::vector<int32_t>* table);

  // Returns blocks to the pool. Each id must be in use (checked: returning a
  // free or unknown id is a programming error reported as false).
  bool Free(std::span<const int32_t> blocks);

  bool IsFree(int32_t block) const;

 private:
  int32_t num_blocks_;
  std::vector<int32_t> free_;  // stack: the most recently freed is reused first
  std::vector<bool> in_use_;
};

}  // namespace morphserve::scheduler

#endif  // MORPHSERVE_SCHEDULER_BLOCK_POOL_H_
