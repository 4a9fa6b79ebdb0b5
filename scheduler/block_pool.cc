#include "scheduler/block_pool.h"

namespace morphserve::scheduler {

BlockPool::BlockPool(int32_t num_blocks)
    : num_blocks_(num_blocks), in_use_(static_cast<size_t>(num_blocks), false) {
  free_.reserve(num_blocks);
  for (int32_t i = num_blocks - 1; i >= 0; --i) free_.push_back(i);
}

bool BlockPool::Allocate(int32_t n, std::vector<int32_t>* table) {
  if (n < 0 || n > num_free()) return false;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t id = free_.back();
    free_.pop_back();
    in_use_[id] = true;
    table->push_back(id);
  }
  return true;
}

bool BlockPool::Free(std::span<const int32_t> blocks) {
  for (int32_t id : blocks) {
    if (id < 0 || id >= num_blocks_ || !in_use_[id]) return false;
  }
  for (int32_t id : blocks) {
    in_use_[id] = false;
    free_.push_back(id);
  }
  return true;
}

bool BlockPool::IsFree(int32_t block) const {
  return block >= 0 && block < num_blocks_ && !in_use_[block];
}

}  // namespace morphserve::scheduler
