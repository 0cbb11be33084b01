// Dense ids for the distinct tokens (and n-gram keys) of one reference, shared by the CPU
// kernels of ngram_overlap and lcs_length: built once per reference and probed with each of
// its candidates' tokens.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lambdapo {

// Open-addressing set of 64-bit keys (never ~0): linear probing at load <= 1/4 without
// wrap-around (a run of occupied slots is at most homes/4 long, so homes/4 + 1 slots past the
// last home keep every probe in bounds). A key's slot index is its dense id.
class KeySlots {
 public:
  // Empties the set, sized for up to max_keys keys.
  void reset(int64_t max_keys) {
    shift_ = shift_for(max_keys);
    const int64_t homes = int64_t{1} << (64 - shift_);
    keys_.assign(homes + homes / 4 + 1, kEmpty);
  }
  // Empties the set for up to max_keys keys, given every slot that holds a key now
  // (repeats allowed): when the table keeps its size only those are cleared, O(keys) rather
  // than O(capacity). Returns whether the whole table was cleared instead.
  bool reset(int64_t max_keys, const int64_t* occupied, int64_t num_occupied) {
    if (keys_.empty() || shift_for(max_keys) != shift_) {
      reset(max_keys);
      return true;
    }
    for (int64_t i = 0; i < num_occupied; ++i) keys_[occupied[i]] = kEmpty;
    return false;
  }
  int64_t capacity() const { return static_cast<int64_t>(keys_.size()); }

  int64_t insert(uint64_t key) {
    const int64_t slot = settle(key);
    keys_[slot] = key;
    return slot;
  }
  // The key's slot, or -1.
  int64_t find(uint64_t key) const {
    const int64_t slot = settle(key);
    const int64_t hit = -static_cast<int64_t>(keys_[slot] == key);  // all ones on a hit
    return slot | ~hit;
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};

  // 64 - log2(homes), homes the smallest power of two >= 16 and >= 4 * max_keys.
  static int shift_for(int64_t max_keys) {
    int64_t homes = 16;
    int shift = 60;
    while (homes < 4 * max_keys) homes <<= 1, --shift;
    return shift;
  }

  // Fibonacci hashing: the top bits of key * 2^64/phi depend on every bit of the key.
  int64_t home(uint64_t key) const {
    return static_cast<int64_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  // 0 iff the slot holding `stored` holds key or is empty (kEmpty + 1 wraps to 0).
  static uint64_t other_key(uint64_t stored, uint64_t key) {
    return std::min(stored ^ key, stored + 1);
  }
  // The first slot from the key's home that holds the key or is empty. The two slots at home
  // settle almost every key, and their test is arithmetic, not a branch per slot.
  int64_t settle(uint64_t key) const {
    int64_t slot = home(key);
    const uint64_t first = other_key(keys_[slot], key);
    if (C10_LIKELY(std::min(first, other_key(keys_[slot + 1], key)) == 0)) {
      return slot + (first != 0);
    }
    for (slot += 2; other_key(keys_[slot], key) != 0;) ++slot;
    return slot;
  }

  std::vector<uint64_t> keys_;
  int shift_ = 64;
};

// Dense ids 0..u-1 of the u distinct tokens of one reference: a direct-address array for
// token ids in [0, kDirectBound) (any real vocabulary), a KeySlots table for the others (every
// int64 >= 0 is a valid token id; negative ones only reach the kernels unchecked, and are
// counted like any other value, as the CUDA kernels compare them).
class TokenIds {
 public:
  static constexpr int64_t kDirectBound = int64_t{1} << 20;

  // ids[i] = id of ref[i]; returns u. ref must stay valid until the next assign, which
  // clears its entries.
  int64_t assign(const int64_t* ref, int64_t len, int64_t* ids) {
    for (int64_t i = 0; i < ref_len_; ++i) {
      if (is_direct(ref_[i])) direct_[ref_[i]] = -1;
    }
    ref_ = ref;
    ref_len_ = len;
    any_large_ = false;
    int64_t next = 0;
    for (int64_t i = 0; i < len; ++i) {
      const int64_t token = ref[i];
      if (C10_UNLIKELY(static_cast<uint64_t>(token) >= direct_.size())) {
        if (!is_direct(token)) {
          ids[i] = assign_large(token, next);
          continue;
        }
        direct_.resize(std::min(kDirectBound, std::max<int64_t>(token + 1, 2 * direct_.size())),
                       -1);
      }
      // A new token takes id `next`, without a branch.
      const int32_t id = direct_[token];
      const int32_t dense = id < 0 ? static_cast<int32_t>(next) : id;
      direct_[token] = dense;
      next += id < 0;
      ids[i] = dense;
    }
    return next;
  }

  // The token's id, or -1 when the reference lacks it.
  int64_t find(int64_t token) const {
    if (C10_LIKELY(static_cast<uint64_t>(token) < direct_.size())) return direct_[token];
    if (is_direct(token) || !any_large_) return -1;
    const int64_t slot = large_.find(large_key(token));
    return slot < 0 ? -1 : large_ids_[slot];
  }

 private:
  static bool is_direct(int64_t token) {
    return static_cast<uint64_t>(token) < static_cast<uint64_t>(kDirectBound);
  }
  // The KeySlots key of a token outside [0, kDirectBound): one to one, and never KeySlots'
  // empty ~0 (only token 0, a direct one, would map there).
  static uint64_t large_key(int64_t token) { return static_cast<uint64_t>(token) - 1; }

  int64_t assign_large(int64_t token, int64_t& next) {
    if (!any_large_) {
      large_.reset(ref_len_);
      large_ids_.assign(large_.capacity(), -1);
      any_large_ = true;
    }
    int32_t& id = large_ids_[large_.insert(large_key(token))];
    if (id < 0) id = static_cast<int32_t>(next++);
    return id;
  }

  std::vector<int32_t> direct_;  // token -> id, -1 when absent
  KeySlots large_;
  std::vector<int32_t> large_ids_;  // slot of large_ -> id, -1 when empty
  const int64_t* ref_ = nullptr;
  int64_t ref_len_ = 0;
  bool any_large_ = false;
};

}  // namespace lambdapo
