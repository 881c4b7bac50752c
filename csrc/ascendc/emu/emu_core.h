// cpattn AscendC CPU emulation: the state of one emulated vector core and of one launch.
//
// Clean-room code written from the public AscendC documentation (CANN 9.1); no Huawei header
// text. Everything here is host C++: blocks of a launch run one after another on the calling
// thread, each with its own unified buffer (UB), pipe clocks and event flags. Every broken rule
// throws emu::RuleError whose message starts with "ascendc-emu rule '<rule>'".
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace emu {

// ---------------------------------------------------------------- errors

struct RuleError : std::runtime_error {
    std::string rule;
    RuleError(const std::string& r, const std::string& msg) : std::runtime_error(msg), rule(r) {}
};

// Rule names (stable: tests and docs refer to them).
namespace rule {
constexpr const char* UB_OVERFLOW = "ub-overflow";          // InitBuffer beyond 192 KiB - 256 B
constexpr const char* UB_BOUNDS = "ub-bounds";              // access outside the tensor's buffer
constexpr const char* UB_ALIGN = "ub-align";                // local address not 32-byte aligned
constexpr const char* QUEUE = "queue-discipline";           // Alloc -> EnQue -> DeQue -> Free
constexpr const char* QUEUE_DEPTH = "queue-depth";          // more tensors in flight than depth / buffers
constexpr const char* TENSOR_STATE = "tensor-state";        // touching a queue tensor in the wrong state
constexpr const char* LEAK = "leak";                        // tensor not freed at kernel end
constexpr const char* COPY_ALIGN = "datacopy-align";        // DataCopy of a non-32-byte multiple
constexpr const char* COPY_PAD = "datacopypad-params";      // DataCopyPad parameter out of range
constexpr const char* GM_BOUNDS = "gm-bounds";              // global access outside a launch buffer
constexpr const char* REPEAT = "repeat-limit";              // repeatTime > 255
constexpr const char* MASK = "vector-mask";                 // mask out of range
constexpr const char* COUNT_ALIGN = "count-align";          // count form needing 256-byte multiples
constexpr const char* CAST_MODE = "cast-round-mode";        // unsupported (src, dst, RoundMode)
constexpr const char* RACE = "pipe-race";                   // missing EnQue/DeQue, SetFlag/WaitFlag, PipeBarrier
constexpr const char* FLAG = "flag-balance";                // SetFlag/WaitFlag pairing
constexpr const char* BLOCK_OVERLAP = "block-overlap";      // two blocks write (or write and read) the same bytes
constexpr const char* RESERVED_UB = "reserved-ub";          // API needing reserved UB without room
constexpr const char* OVERLAP = "operand-overlap";          // partial src/dst overlap in a vector op
constexpr const char* USAGE = "api-usage";                  // anything else the API forbids
}  // namespace rule

[[noreturn]] void fail(const char* r, const std::string& msg);

template <typename... A>
std::string cat(A&&... a) {
    std::ostringstream s;
    (s << ... << a);
    return s.str();
}

// ---------------------------------------------------------------- constants (Atlas A2)

constexpr uint32_t UB_SIZE = 192 * 1024 - 256;  // usable unified buffer per vector core
constexpr uint32_t BLOCK = 32;                   // data block
constexpr uint32_t REPEAT_BYTES = 256;           // one vector repeat
constexpr uint32_t SELECT_RESERVED = 8 * 1024;   // UB that Select (modes 1, 2) and Compares reserve on A2

// Pipes, in the order of pipe_t below.
enum Pipe : int { P_S = 0, P_V, P_M, P_MTE1, P_MTE2, P_MTE3, P_COUNT };
const char* pipe_name(int p);

// ---------------------------------------------------------------- buffers and queues

enum class BufState : uint8_t { FREE, ALLOCED, ENQUEUED, DEQUEUED, CALC };
const char* state_name(BufState s);

struct BufInfo {
    uint32_t offset = 0, len = 0;
    int pos = 0;          // TPosition value
    int queue = -1;       // owning queue id, -1 for TBuf
    BufState state = BufState::CALC;
    int prod = -1, cons = -1;  // producer / consumer pipe of the queue
    std::array<uint64_t, P_COUNT> free_clock{};  // consumer's clock at FreeTensor
    std::array<uint64_t, P_COUNT> enq_clock{};   // producer's clock at EnQue
    std::string name;
};

struct QueueInfo {
    int depth = 0;
    std::vector<int> bufs;
    std::vector<int> fifo;  // buffer ids in EnQue order
    size_t next = 0;        // AllocTensor hands out buffers round-robin
    int prod = -1, cons = -1;
    std::string name;
};

// Shadow state of one 32-byte block of UB for the race checker.
struct Shadow {
    int8_t wpipe = -1;
    uint64_t wseq = 0;
    std::array<uint64_t, P_COUNT> rseq{};
};

struct Core {
    std::vector<uint8_t> ub;   // UB_SIZE bytes, 32-byte aligned base
    uint8_t* base = nullptr;
    uint32_t used = 0;         // bytes handed out by InitBuffer
    std::vector<BufInfo> bufs;
    std::vector<QueueInfo> queues;
    std::vector<Shadow> shadow;
    std::array<uint64_t, P_COUNT> seq{};                          // instructions issued per pipe
    std::array<std::array<uint64_t, P_COUNT>, P_COUNT> clock{};   // clock[p][q]: what p has seen of q
    // one flag per (HardEvent, event id): set count and the clock snapshot of the setter
    std::vector<int> flag_set;
    std::vector<std::array<uint64_t, P_COUNT>> flag_clock;
    std::vector<std::string> log;  // barrier / flag record (tests read it)
    struct GmPending {
        uintptr_t lo, hi;
        int pipe;
        uint64_t seq;
        bool write;
    };
    std::vector<GmPending> gm_pending;  // this block's DataCopy global accesses not yet ordered
    bool pipe_made = false;
    bool reserved_api_used = false;

    void reset();
    uint32_t off(const void* p) const { return uint32_t(static_cast<const uint8_t*>(p) - base); }
    bool in_ub(const void* p) const {
        auto* q = static_cast<const uint8_t*>(p);
        return q >= base && q < base + UB_SIZE + BLOCK;
    }
};

// ---------------------------------------------------------------- launch state

struct GmRegion {
    uintptr_t lo, hi;
    std::string name;
    bool writable;
};

struct GmAccess {
    uintptr_t lo, hi;
    int block;
    bool write;
};

struct Launch {
    int64_t block_idx = 0, block_num = 1;
    std::vector<GmRegion> regions;
    std::vector<GmAccess> accesses;
    bool active = false;
    uint32_t max_ub_used = 0;  // most UB any block of the last launch took with InitBuffer
};

Core& core();
Launch& launch_state();

// ---- race checking: every access to UB is declared by the pipe that makes it
void issue(int pipe);  // one instruction on `pipe`
void ub_read(int pipe, const void* p, size_t bytes, const char* api);
void ub_write(int pipe, const void* p, size_t bytes, const char* api);
void ub_read_blocks(int pipe, const std::vector<uint32_t>& blocks, const char* api);
void ub_write_blocks(int pipe, const std::vector<uint32_t>& blocks, const char* api);

// ---- global memory
// pipe: P_MTE2/P_MTE3 for DataCopy(Pad), whose order within the block is checked too (a read
// of bytes an earlier MTE3 write of this block wrote needs MTE3 -> MTE2 sync, a write over bytes
// MTE2 read needs MTE2 -> MTE3, two overlapping MTE3 writes need PipeBarrier<PIPE_MTE3>); -1
// for scalar accesses (bounds only).
void gm_access(const void* p, size_t bytes, bool write, const char* api, int pipe = -1);

// ---- tensors: find the buffer containing p and check [p, p+bytes) lies in it
int buffer_of(const void* p, size_t bytes, const char* api);
void check_align(const void* p, const char* api, const char* what);
void check_state(int buf, int pipe, bool write, const char* api);

// ---- sync
void set_flag(int event, int src, int dst, int id);
void wait_flag(int event, int src, int dst, int id);
void barrier(int pipe);  // pipe == P_COUNT: PIPE_ALL
void end_of_kernel_checks();

// ---- launching: run fn for every block 0..block_dim-1 with fresh cores
struct Buffer {
    const void* ptr;
    size_t bytes;
    std::string name;
    bool writable;
};
void run_blocks(int64_t block_dim, const std::vector<Buffer>& buffers, const std::function<void()>& body);

}  // namespace emu
