// cpattn AscendC CPU emulation: core state, race checker, global-memory tracking, launch.
#include "emu_core.h"

#include <mutex>

namespace emu {

void fail(const char* r, const std::string& msg) {
    auto& L = launch_state();
    std::string where = L.active ? cat(" [block ", L.block_idx, " of ", L.block_num, "]") : std::string();
    throw RuleError(r, cat("ascendc-emu rule '", r, "': ", msg, where));
}

const char* pipe_name(int p) {
    static const char* names[] = {"PIPE_S", "PIPE_V", "PIPE_M", "PIPE_MTE1", "PIPE_MTE2", "PIPE_MTE3", "PIPE_ALL"};
    return (p >= 0 && p <= P_COUNT) ? names[p] : "PIPE_?";
}

const char* state_name(BufState s) {
    switch (s) {
        case BufState::FREE: return "free";
        case BufState::ALLOCED: return "allocated (not yet EnQue'd)";
        case BufState::ENQUEUED: return "EnQue'd (not yet DeQue'd)";
        case BufState::DEQUEUED: return "DeQue'd";
        default: return "calc buffer";
    }
}

Core& core() {
    static Core c;
    return c;
}

Launch& launch_state() {
    static Launch l;
    return l;
}

void Core::reset() {
    ub.assign(UB_SIZE + 2 * BLOCK, 0xFF);  // poison: 0xFF.. is NaN in every float type
    uintptr_t a = reinterpret_cast<uintptr_t>(ub.data());
    base = ub.data() + ((BLOCK - a % BLOCK) % BLOCK);
    used = 0;
    bufs.clear();
    queues.clear();
    shadow.assign(UB_SIZE / BLOCK + 1, Shadow{});
    seq.fill(0);
    for (auto& c : clock) c.fill(0);
    flag_set.assign(64 * 8, 0);
    flag_clock.assign(64 * 8, {});
    log.clear();
    gm_pending.clear();
    pipe_made = false;
    reserved_api_used = false;
}

// ---------------------------------------------------------------- race checker

void issue(int pipe) {
    auto& c = core();
    c.seq[pipe]++;
    if (pipe == P_S) c.clock[P_S][P_S] = c.seq[P_S];  // the scalar unit is in order by itself
}

static void read_block(int pipe, uint32_t b, const char* api) {
    auto& c = core();
    Shadow& s = c.shadow[b];
    if (s.wpipe >= 0 && c.clock[pipe][s.wpipe] < s.wseq) {
        const char* hint = pipe == s.wpipe ? "a PipeBarrier<" : "EnQue/DeQue or SetFlag/WaitFlag from ";
        fail(rule::RACE, cat(api, " on ", pipe_name(pipe), " reads UB bytes [", b * BLOCK, ", ", (b + 1) * BLOCK,
                             ") written by an earlier ", pipe_name(s.wpipe), " instruction with no ", hint,
                             pipe_name(s.wpipe), (pipe == s.wpipe ? ">()" : ""), " in between (read-after-write)"));
    }
    s.rseq[pipe] = c.seq[pipe];
}

static void write_block(int pipe, uint32_t b, const char* api) {
    auto& c = core();
    Shadow& s = c.shadow[b];
    if (s.wpipe == pipe && s.wseq == c.seq[pipe]) return;  // this very instruction wrote it already
    if (s.wpipe >= 0 && c.clock[pipe][s.wpipe] < s.wseq)
        fail(rule::RACE, cat(api, " on ", pipe_name(pipe), " overwrites UB bytes [", b * BLOCK, ", ", (b + 1) * BLOCK,
                             ") written by an earlier ", pipe_name(s.wpipe),
                             " instruction that is not synchronised with it (write-after-write)"));
    for (int r = 0; r < P_COUNT; ++r)
        if (r != pipe && s.rseq[r] > c.clock[pipe][r])
            fail(rule::RACE, cat(api, " on ", pipe_name(pipe), " overwrites UB bytes [", b * BLOCK, ", ",
                                 (b + 1) * BLOCK, ") still being read by ", pipe_name(r),
                                 " (write-after-read; missing FreeTensor/AllocTensor or SetFlag/WaitFlag)"));
    s.wpipe = int8_t(pipe);
    s.wseq = c.seq[pipe];
}

void ub_read(int pipe, const void* p, size_t bytes, const char* api) {
    if (!bytes) return;
    auto& c = core();
    uint32_t o = c.off(p);
    for (uint32_t b = o / BLOCK; b <= (o + bytes - 1) / BLOCK; ++b) read_block(pipe, b, api);
}

void ub_write(int pipe, const void* p, size_t bytes, const char* api) {
    if (!bytes) return;
    auto& c = core();
    uint32_t o = c.off(p);
    for (uint32_t b = o / BLOCK; b <= (o + bytes - 1) / BLOCK; ++b) write_block(pipe, b, api);
}

void ub_read_blocks(int pipe, const std::vector<uint32_t>& blocks, const char* api) {
    for (uint32_t b : blocks) read_block(pipe, b, api);
}

void ub_write_blocks(int pipe, const std::vector<uint32_t>& blocks, const char* api) {
    for (uint32_t b : blocks) write_block(pipe, b, api);
}

// ---------------------------------------------------------------- buffers

int buffer_of(const void* p, size_t bytes, const char* api) {
    auto& c = core();
    if (!c.in_ub(p)) fail(rule::UB_BOUNDS, cat(api, ": local tensor does not point into the unified buffer"));
    uint32_t o = c.off(p);
    for (size_t i = 0; i < c.bufs.size(); ++i) {
        const BufInfo& b = c.bufs[i];
        if (o >= b.offset && o < b.offset + b.len) {
            if (o + bytes > b.offset + b.len)
                fail(rule::UB_BOUNDS, cat(api, ": accesses UB bytes [", o, ", ", o + bytes, ") beyond the end of its buffer '",
                                          b.name, "' [", b.offset, ", ", b.offset + b.len, ")"));
            return int(i);
        }
    }
    fail(rule::UB_BOUNDS, cat(api, ": UB offset ", o, " is in no buffer given out by TPipe::InitBuffer"));
}

void check_align(const void* p, const char* api, const char* what) {
    auto& c = core();
    uint32_t o = c.off(p);
    if (o % BLOCK)
        fail(rule::UB_ALIGN, cat(api, ": ", what, " starts at UB offset ", o, ", not 32-byte aligned"));
}

void check_state(int buf, int pipe, bool write, const char* api) {
    auto& c = core();
    BufInfo& b = c.bufs[buf];
    if (b.queue < 0) return;  // TBuf: no queue states (the race checker still applies)
    const char* what = write ? "writes" : "reads";
    if (b.state == BufState::FREE || b.state == BufState::ENQUEUED)
        fail(rule::TENSOR_STATE, cat(api, " ", what, " a tensor of queue buffer '", b.name, "' that is ", state_name(b.state)));
    if (pipe == P_S) return;  // scalar access: ordered through flags, checked by the race checker
    if (b.state == BufState::ALLOCED && pipe != b.prod)
        fail(rule::TENSOR_STATE, cat(api, " on ", pipe_name(pipe), " ", what, " a tensor of '", b.name,
                                     "' that is allocated but not yet EnQue'd/DeQue'd (only ", pipe_name(b.prod),
                                     " may touch it before EnQue)"));
    if (b.state == BufState::DEQUEUED && pipe != b.cons)
        fail(rule::TENSOR_STATE, cat(api, " on ", pipe_name(pipe), " ", what, " a tensor of '", b.name,
                                     "' after DeQue (only ", pipe_name(b.cons), " consumes this queue)"));
}

// ---------------------------------------------------------------- global memory

static void gm_order(uintptr_t lo, uintptr_t hi, bool write, int pipe, const char* api) {
    auto& c = core();
    const uint64_t now = c.seq[pipe];
    auto synced = [&](const Core::GmPending& e, int by) { return c.clock[by][e.pipe] >= e.seq; };
    // forget accesses every other DataCopy pipe is ordered after
    c.gm_pending.erase(std::remove_if(c.gm_pending.begin(), c.gm_pending.end(),
                                      [&](const Core::GmPending& e) {
                                          return e.write ? synced(e, P_MTE2) && synced(e, P_MTE3) : synced(e, P_MTE3);
                                      }),
                       c.gm_pending.end());
    for (const auto& e : c.gm_pending) {
        if (e.hi <= lo || hi <= e.lo || (e.pipe == pipe && e.seq == now)) continue;
        if (e.write && !write && !synced(e, pipe))
            fail(rule::RACE, cat(api, " reads global bytes that an earlier DataCopy to GM of this block writes, with no "
                                      "SetFlag/WaitFlag<HardEvent::MTE3_MTE2> in between (read-after-write)"));
        if (!e.write && write && !synced(e, pipe))
            fail(rule::RACE, cat(api, " writes global bytes that an earlier DataCopy from GM of this block reads, with "
                                      "no synchronisation in between (write-after-read)"));
        if (e.write && write && !synced(e, pipe))
            fail(rule::RACE, cat(api, " writes global bytes an earlier DataCopy to GM of this block writes, with no "
                                      "PipeBarrier<PIPE_MTE3>() in between (write-after-write)"));
    }
    c.gm_pending.push_back({lo, hi, pipe, now, write});
}

void gm_access(const void* p, size_t bytes, bool write, const char* api, int pipe) {
    if (!bytes) return;
    auto& L = launch_state();
    if (!L.active) fail(rule::USAGE, cat(api, ": global memory access outside a kernel launch"));
    uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + bytes;
    if (pipe == P_MTE2 || pipe == P_MTE3) gm_order(lo, hi, write, pipe, api);
    for (const auto& r : L.regions) {
        if (lo >= r.lo && hi <= r.hi) {
            if (write && !r.writable)
                fail(rule::GM_BOUNDS, cat(api, ": writes the read-only launch buffer '", r.name, "'"));
            L.accesses.push_back({lo, hi, int(L.block_idx), write});
            return;
        }
    }
    fail(rule::GM_BOUNDS, cat(api, ": ", write ? "writes" : "reads", " ", bytes,
                              " global bytes that lie in no buffer of the launch (out of bounds)"));
}

// ---------------------------------------------------------------- sync

void set_flag(int event, int src, int dst, int id) {
    auto& c = core();
    if (id < 0 || id >= 8) fail(rule::FLAG, cat("SetFlag: event id ", id, " out of range 0..7"));
    int k = event * 8 + id;
    if (c.flag_set[k] > 0)
        fail(rule::FLAG, cat("SetFlag<", pipe_name(src), "->", pipe_name(dst), ">(", id,
                             ") while the same flag is still set (no WaitFlag in between)"));
    c.flag_set[k] = 1;
    auto snap = c.clock[src];
    snap[src] = c.seq[src];
    c.flag_clock[k] = snap;
    c.log.push_back(cat("SetFlag ", pipe_name(src), "->", pipe_name(dst), " ", id));
}

void wait_flag(int event, int src, int dst, int id) {
    auto& c = core();
    if (id < 0 || id >= 8) fail(rule::FLAG, cat("WaitFlag: event id ", id, " out of range 0..7"));
    int k = event * 8 + id;
    if (c.flag_set[k] == 0)
        fail(rule::FLAG, cat("WaitFlag<", pipe_name(src), "->", pipe_name(dst), ">(", id,
                             ") with no matching SetFlag before it (would wait forever on the NPU)"));
    c.flag_set[k] = 0;
    for (int q = 0; q < P_COUNT; ++q) c.clock[dst][q] = std::max(c.clock[dst][q], c.flag_clock[k][q]);
    c.log.push_back(cat("WaitFlag ", pipe_name(src), "->", pipe_name(dst), " ", id));
}

void barrier(int pipe) {
    auto& c = core();
    if (pipe == P_COUNT) {
        for (int p = 0; p < P_COUNT; ++p)
            for (int q = 0; q < P_COUNT; ++q) c.clock[p][q] = std::max(c.clock[p][q], c.seq[q]);
    } else {
        if (pipe == P_S) fail(rule::USAGE, "PipeBarrier<PIPE_S> is not supported (the scalar unit is in order)");
        c.clock[pipe][pipe] = c.seq[pipe];
    }
    c.log.push_back(cat("PipeBarrier ", pipe_name(pipe)));
}

void end_of_kernel_checks() {
    auto& c = core();
    for (const auto& b : c.bufs)
        if (b.queue >= 0 && b.state != BufState::FREE)
            fail(rule::LEAK, cat("kernel ended with a tensor of queue buffer '", b.name, "' ", state_name(b.state),
                                 " (every AllocTensor needs EnQue, DeQue and FreeTensor)"));
    for (size_t k = 0; k < c.flag_set.size(); ++k)
        if (c.flag_set[k])
            fail(rule::FLAG, cat("kernel ended with a SetFlag (event ", k / 8, ", id ", k % 8, ") never waited for"));
}

// ---------------------------------------------------------------- launch

static std::mutex launch_mutex;

void run_blocks(int64_t block_dim, const std::vector<Buffer>& buffers, const std::function<void()>& body) {
    std::lock_guard<std::mutex> lock(launch_mutex);
    auto& L = launch_state();
    if (block_dim < 1 || block_dim > 65535)
        throw RuleError(rule::USAGE, cat("ascendc-emu rule 'api-usage': block dim ", block_dim, " outside 1..65535"));
    L.regions.clear();
    L.accesses.clear();
    for (const auto& b : buffers) {
        if (!b.ptr || !b.bytes) continue;
        uintptr_t lo = reinterpret_cast<uintptr_t>(b.ptr);
        L.regions.push_back({lo, lo + b.bytes, b.name, b.writable});
    }
    L.block_num = block_dim;
    L.max_ub_used = 0;
    L.active = true;
    struct Off {
        ~Off() { launch_state().active = false; }
    } off;
    for (int64_t i = 0; i < block_dim; ++i) {
        L.block_idx = i;
        core().reset();
        body();
        end_of_kernel_checks();
        L.max_ub_used = std::max(L.max_ub_used, core().used);
    }
    L.active = false;
    // Blocks run in parallel on the NPU: no two may write the same bytes, and none may read
    // bytes that another writes.
    auto acc = L.accesses;
    std::sort(acc.begin(), acc.end(), [](const GmAccess& a, const GmAccess& b) { return a.lo < b.lo; });
    // sweep: keep the writes that are still open
    std::vector<const GmAccess*> open_w, open_r;
    for (const auto& a : acc) {
        auto prune = [&](std::vector<const GmAccess*>& v) {
            v.erase(std::remove_if(v.begin(), v.end(), [&](const GmAccess* x) { return x->hi <= a.lo; }), v.end());
        };
        prune(open_w);
        prune(open_r);
        for (const GmAccess* w : open_w)
            if (w->block != a.block)
                fail(rule::BLOCK_OVERLAP, cat("blocks ", w->block, " and ", a.block, " both ", a.write ? "write" : "touch",
                                              " global bytes at offset ", a.lo - w->lo, " of a range block ", w->block,
                                              " writes (blocks run in parallel on the NPU: a race)"));
        if (a.write)
            for (const GmAccess* r : open_r)
                if (r->block != a.block)
                    fail(rule::BLOCK_OVERLAP, cat("block ", a.block, " writes global bytes that block ", r->block,
                                                  " reads (blocks run in parallel on the NPU: a race)"));
        (a.write ? open_w : open_r).push_back(&a);
    }
}

}  // namespace emu
