// cpattn AscendC CPU emulation: positions, events, tensors, TPipe/TQue/TBuf, sync, block ids.
#pragma once

#include "emu_core.h"
#include "emu_types.h"

// ---- compiler keywords of bisheng, empty on the host
#ifndef __aicore__
#define __aicore__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __gm__
#define __gm__
#endif
typedef uint8_t* GM_ADDR;

enum pipe_t { PIPE_S = 0, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_ALL };
enum event_t { EVENT_ID0 = 0, EVENT_ID1, EVENT_ID2, EVENT_ID3, EVENT_ID4, EVENT_ID5, EVENT_ID6, EVENT_ID7 };

namespace AscendC {

enum class TPosition : uint8_t { GM, A1, A2, B1, B2, C1, C2, CO1, CO2, VECIN, VECOUT, VECCALC, LCM = VECCALC, SPM,
                                 SHM = SPM, TSCM, C2PIPE2GM, C2PIPE2LOCAL, MAX };
using QuePosition = TPosition;

enum class HardEvent : uint8_t {
    MTE2_MTE1, MTE1_MTE2, MTE1_M, M_MTE1, MTE2_V, V_MTE2, MTE3_V, V_MTE3, M_V, V_M, V_V, MTE3_MTE1, MTE1_MTE3,
    MTE1_V, MTE2_M, M_MTE2, V_MTE1, M_FIX, FIX_M, MTE3_MTE2, MTE2_MTE3, S_V, V_S, S_MTE2, MTE2_S, S_MTE3, MTE3_S,
    MTE2_FIX, FIX_MTE2, FIX_S, M_S, FIX_MTE3, MTE1_FIX, FIX_MTE1, FIX_FIX, MAX
};
using TEventID = int8_t;

namespace detail {
// (source pipe, destination pipe) of a HardEvent; FIX events are not emulated.
inline std::pair<int, int> event_pipes(HardEvent e) {
    using namespace emu;
    switch (e) {
        case HardEvent::MTE2_MTE1: return {P_MTE2, P_MTE1};
        case HardEvent::MTE1_MTE2: return {P_MTE1, P_MTE2};
        case HardEvent::MTE1_M: return {P_MTE1, P_M};
        case HardEvent::M_MTE1: return {P_M, P_MTE1};
        case HardEvent::MTE2_V: return {P_MTE2, P_V};
        case HardEvent::V_MTE2: return {P_V, P_MTE2};
        case HardEvent::MTE3_V: return {P_MTE3, P_V};
        case HardEvent::V_MTE3: return {P_V, P_MTE3};
        case HardEvent::M_V: return {P_M, P_V};
        case HardEvent::V_M: return {P_V, P_M};
        case HardEvent::V_V: return {P_V, P_V};
        case HardEvent::MTE3_MTE1: return {P_MTE3, P_MTE1};
        case HardEvent::MTE1_MTE3: return {P_MTE1, P_MTE3};
        case HardEvent::MTE1_V: return {P_MTE1, P_V};
        case HardEvent::MTE2_M: return {P_MTE2, P_M};
        case HardEvent::M_MTE2: return {P_M, P_MTE2};
        case HardEvent::V_MTE1: return {P_V, P_MTE1};
        case HardEvent::MTE3_MTE2: return {P_MTE3, P_MTE2};
        case HardEvent::MTE2_MTE3: return {P_MTE2, P_MTE3};
        case HardEvent::S_V: return {P_S, P_V};
        case HardEvent::V_S: return {P_V, P_S};
        case HardEvent::S_MTE2: return {P_S, P_MTE2};
        case HardEvent::MTE2_S: return {P_MTE2, P_S};
        case HardEvent::S_MTE3: return {P_S, P_MTE3};
        case HardEvent::MTE3_S: return {P_MTE3, P_S};
        case HardEvent::M_S: return {P_M, P_S};
        default: emu::fail(emu::rule::USAGE, "FIX-pipe events are not emulated");
    }
}

inline void queue_pipes(TPosition pos, int& prod, int& cons) {
    using namespace emu;
    switch (pos) {
        case TPosition::VECIN: prod = P_MTE2; cons = P_V; return;
        case TPosition::VECOUT: prod = P_V; cons = P_MTE3; return;
        case TPosition::VECCALC: prod = P_V; cons = P_V; return;
        default: emu::fail(emu::rule::USAGE, "only VECIN/VECOUT/VECCALC queues are emulated");
    }
}
}  // namespace detail

// ---------------------------------------------------------------- LocalTensor

template <typename T>
class LocalTensor {
public:
    LocalTensor() = default;
    LocalTensor(T* p, uint32_t n, int buf) : ptr_(p), size_(n), buf_(buf) {}

    LocalTensor operator[](uint32_t offset) const {
        valid("LocalTensor::operator[]");
        if (offset > size_)
            emu::fail(emu::rule::UB_BOUNDS, emu::cat("LocalTensor::operator[]: offset ", offset, " beyond the tensor's ",
                                                     size_, " elements"));
        return LocalTensor(ptr_ + offset, size_ - offset, buf_);
    }
    T GetValue(uint32_t i) const {
        scalar(i, false, "LocalTensor::GetValue");
        return ptr_[i];
    }
    void SetValue(uint32_t i, T v) const {
        scalar(i, true, "LocalTensor::SetValue");
        ptr_[i] = v;
    }
    uint32_t GetSize() const { return size_; }
    void SetSize(uint32_t n) {
        valid("LocalTensor::SetSize");
        emu::buffer_of(ptr_, size_t(n) * sizeof(T), "LocalTensor::SetSize");
        size_ = n;
    }
    uint64_t GetPhyAddr() const { return emu::core().off(ptr_); }
    template <typename U>
    LocalTensor<U> ReinterpretCast() const {
        return LocalTensor<U>(reinterpret_cast<U*>(ptr_), uint32_t(uint64_t(size_) * sizeof(T) / sizeof(U)), buf_);
    }
    TPosition GetPosition() const { return TPosition(emu::core().bufs.at(buf_).pos); }

    // ---- emulation internals (not AscendC API)
    T* emu_ptr() const { return ptr_; }
    int emu_buf() const { return buf_; }
    void valid(const char* api) const {
        if (!ptr_) emu::fail(emu::rule::USAGE, emu::cat(api, ": tensor was never allocated"));
    }

private:
    void scalar(uint32_t i, bool write, const char* api) const {
        valid(api);
        if (i >= size_) emu::fail(emu::rule::UB_BOUNDS, emu::cat(api, ": index ", i, " beyond ", size_, " elements"));
        int b = emu::buffer_of(ptr_ + i, sizeof(T), api);
        emu::check_state(b, emu::P_S, write, api);
        emu::issue(emu::P_S);
        if (write) emu::ub_write(emu::P_S, ptr_ + i, sizeof(T), api);
        else emu::ub_read(emu::P_S, ptr_ + i, sizeof(T), api);
    }
    T* ptr_ = nullptr;
    uint32_t size_ = 0;
    int buf_ = -1;
};

// ---------------------------------------------------------------- GlobalTensor

template <typename T>
class GlobalTensor {
public:
    void SetGlobalBuffer(__gm__ T* p, uint64_t n) { ptr_ = p; size_ = n; sized_ = true; }
    void SetGlobalBuffer(__gm__ T* p) { ptr_ = p; size_ = 0; sized_ = false; }
    GlobalTensor operator[](uint64_t offset) const {
        GlobalTensor g;
        g.ptr_ = ptr_ + offset;
        g.sized_ = sized_;
        if (sized_) {
            if (offset > size_)
                emu::fail(emu::rule::GM_BOUNDS, emu::cat("GlobalTensor::operator[]: offset ", offset, " beyond ", size_,
                                                         " elements"));
            g.size_ = size_ - offset;
        }
        return g;
    }
    T GetValue(uint64_t i) const {
        span(i, 1, "GlobalTensor::GetValue");
        emu::gm_access(ptr_ + i, sizeof(T), false, "GlobalTensor::GetValue");
        return ptr_[i];
    }
    void SetValue(uint64_t i, T v) const {
        span(i, 1, "GlobalTensor::SetValue");
        emu::gm_access(ptr_ + i, sizeof(T), true, "GlobalTensor::SetValue");
        ptr_[i] = v;
    }
    __gm__ T* GetPhyAddr() const { return ptr_; }
    __gm__ T* GetPhyAddr(uint64_t offset) const { return ptr_ + offset; }
    uint64_t GetSize() const { return size_; }

    // ---- emulation internals
    T* emu_ptr() const { return ptr_; }
    // [elem, elem + n) must lie inside the size given to SetGlobalBuffer
    void span(uint64_t elem, uint64_t n, const char* api) const {
        if (!ptr_) emu::fail(emu::rule::USAGE, emu::cat(api, ": GlobalTensor without SetGlobalBuffer"));
        if (sized_ && elem + n > size_)
            emu::fail(emu::rule::GM_BOUNDS, emu::cat(api, ": elements [", elem, ", ", elem + n,
                                                     ") beyond the GlobalTensor's ", size_, " elements"));
    }

private:
    T* ptr_ = nullptr;
    uint64_t size_ = 0;
    bool sized_ = false;
};

// ---------------------------------------------------------------- queues and buffers

class TPipe;

template <TPosition pos, int32_t depth, auto mask = 0>
class TQue {
public:
    template <typename T>
    LocalTensor<T> AllocTensor() {
        auto& q = info("TQue::AllocTensor");
        auto& c = emu::core();
        for (size_t k = 0; k < q.bufs.size(); ++k) {
            int b = q.bufs[(q.next + k) % q.bufs.size()];
            auto& bi = c.bufs[b];
            if (bi.state != emu::BufState::FREE) continue;
            q.next = (q.next + k + 1) % q.bufs.size();
            bi.state = emu::BufState::ALLOCED;
            // the implicit WaitFlag<consumer -> producer> of the buffer's last FreeTensor
            for (int p = 0; p < emu::P_COUNT; ++p) c.clock[bi.prod][p] = std::max(c.clock[bi.prod][p], bi.free_clock[p]);
            return LocalTensor<T>(reinterpret_cast<T*>(c.base + bi.offset), bi.len / sizeof(T), b);
        }
        emu::fail(emu::rule::QUEUE_DEPTH, emu::cat("AllocTensor on queue '", q.name, "' with all ", q.bufs.size(),
                                                   " buffers in use (the NPU would wait forever)"));
    }
    template <typename T>
    void AllocTensor(LocalTensor<T>& t) { t = AllocTensor<T>(); }

    template <typename T>
    bool EnQue(const LocalTensor<T>& t) {
        auto& q = info("TQue::EnQue");
        auto& c = emu::core();
        int b = own(t, "EnQue");
        auto& bi = c.bufs[b];
        if (bi.state != emu::BufState::ALLOCED)
            emu::fail(emu::rule::QUEUE, emu::cat("EnQue on '", q.name, "' of a tensor that is ", emu::state_name(bi.state),
                                                 " (expected AllocTensor first)"));
        if (int(q.fifo.size()) >= depth)
            emu::fail(emu::rule::QUEUE_DEPTH, emu::cat("EnQue on '", q.name, "' beyond its depth ", depth));
        bi.state = emu::BufState::ENQUEUED;
        bi.enq_clock = c.clock[bi.prod];
        bi.enq_clock[bi.prod] = c.seq[bi.prod];
        q.fifo.push_back(b);
        return true;
    }

    template <typename T>
    LocalTensor<T> DeQue() {
        auto& q = info("TQue::DeQue");
        auto& c = emu::core();
        if (q.fifo.empty())
            emu::fail(emu::rule::QUEUE, emu::cat("DeQue on '", q.name, "' with no tensor EnQue'd (the NPU would wait forever)"));
        int b = q.fifo.front();
        q.fifo.erase(q.fifo.begin());
        auto& bi = c.bufs[b];
        bi.state = emu::BufState::DEQUEUED;
        for (int p = 0; p < emu::P_COUNT; ++p) c.clock[bi.cons][p] = std::max(c.clock[bi.cons][p], bi.enq_clock[p]);
        return LocalTensor<T>(reinterpret_cast<T*>(c.base + bi.offset), bi.len / sizeof(T), b);
    }
    template <typename T>
    void DeQue(LocalTensor<T>& t) { t = DeQue<T>(); }

    template <typename T>
    void FreeTensor(LocalTensor<T>& t) {
        auto& q = info("TQue::FreeTensor");
        auto& c = emu::core();
        int b = own(t, "FreeTensor");
        auto& bi = c.bufs[b];
        if (bi.state == emu::BufState::FREE)
            emu::fail(emu::rule::QUEUE, emu::cat("FreeTensor on '", q.name, "' of a tensor already freed (double free)"));
        if (bi.state != emu::BufState::DEQUEUED)
            emu::fail(emu::rule::QUEUE, emu::cat("FreeTensor on '", q.name, "' of a tensor that is ", emu::state_name(bi.state),
                                                 " (expected EnQue and DeQue first)"));
        bi.state = emu::BufState::FREE;
        bi.free_clock = c.clock[bi.cons];
        bi.free_clock[bi.cons] = c.seq[bi.cons];
    }

    bool VacantInQue() { return int(info("TQue::VacantInQue").fifo.size()) < depth; }
    bool HasTensorInQue() { return !info("TQue::HasTensorInQue").fifo.empty(); }
    int32_t GetTensorCountInQue() { return int32_t(info("TQue::GetTensorCountInQue").fifo.size()); }

    // ---- emulation internals
    int emu_id = -1;
    static constexpr TPosition emu_pos = pos;
    static constexpr int32_t emu_depth = depth;

private:
    emu::QueueInfo& info(const char* api) {
        if (emu_id < 0) emu::fail(emu::rule::USAGE, emu::cat(api, ": queue used before TPipe::InitBuffer"));
        return emu::core().queues[emu_id];
    }
    template <typename T>
    int own(const LocalTensor<T>& t, const char* api) {
        t.valid(api);
        int b = t.emu_buf();
        if (b < 0 || emu::core().bufs[b].queue != emu_id)
            emu::fail(emu::rule::QUEUE, emu::cat(api, " on '", info(api).name, "' of a tensor of another queue or buffer"));
        if (reinterpret_cast<uint8_t*>(t.emu_ptr()) != emu::core().base + emu::core().bufs[b].offset)
            emu::fail(emu::rule::QUEUE, emu::cat(api, " on '", info(api).name, "' of a sub-tensor (pass the tensor AllocTensor returned)"));
        return b;
    }
};

template <TPosition pos = TPosition::LCM>
class TBuf {
public:
    template <typename T>
    LocalTensor<T> Get() {
        auto& bi = info("TBuf::Get");
        return LocalTensor<T>(reinterpret_cast<T*>(emu::core().base + bi.offset), bi.len / sizeof(T), emu_id);
    }
    template <typename T>
    LocalTensor<T> Get(uint32_t len) {
        auto& bi = info("TBuf::Get");
        if (uint64_t(len) * sizeof(T) > bi.len)
            emu::fail(emu::rule::UB_BOUNDS, emu::cat("TBuf::Get(", len, "): more than the buffer's ", bi.len, " bytes"));
        return LocalTensor<T>(reinterpret_cast<T*>(emu::core().base + bi.offset), len, emu_id);
    }
    template <typename T>
    LocalTensor<T> GetWithOffset(uint32_t size, uint32_t bufOffset) {
        auto& bi = info("TBuf::GetWithOffset");
        if (bufOffset % emu::BLOCK)
            emu::fail(emu::rule::UB_ALIGN, emu::cat("TBuf::GetWithOffset: offset ", bufOffset, " not 32-byte aligned"));
        if (bufOffset + uint64_t(size) * sizeof(T) > bi.len)
            emu::fail(emu::rule::UB_BOUNDS, "TBuf::GetWithOffset: beyond the buffer");
        return LocalTensor<T>(reinterpret_cast<T*>(emu::core().base + bi.offset + bufOffset), size, emu_id);
    }
    int emu_id = -1;
    static constexpr TPosition emu_pos = pos;

private:
    emu::BufInfo& info(const char* api) {
        if (emu_id < 0) emu::fail(emu::rule::USAGE, emu::cat(api, ": buffer used before TPipe::InitBuffer"));
        return emu::core().bufs[emu_id];
    }
};

class TPipe;
namespace detail {
inline TPipe*& current_pipe() {
    static TPipe* p = nullptr;
    return p;
}
}  // namespace detail

class TPipe {
public:
    TPipe() { detail::current_pipe() = this; emu::core().pipe_made = true; }
    ~TPipe() { if (detail::current_pipe() == this) detail::current_pipe() = nullptr; }

    template <class Q>
    bool InitBuffer(Q& que, uint8_t num, uint32_t len) {
        auto& c = emu::core();
        if (que.emu_id >= 0) emu::fail(emu::rule::USAGE, "InitBuffer called twice for one queue");
        if (num < 1) emu::fail(emu::rule::USAGE, "InitBuffer with 0 buffers");
        if (Q::emu_depth < 1) emu::fail(emu::rule::USAGE, "TQue depth must be >= 1");
        uint32_t l = round32(len);
        emu::QueueInfo q;
        q.depth = Q::emu_depth;
        q.name = emu::cat("que", c.queues.size());
        detail::queue_pipes(Q::emu_pos, q.prod, q.cons);
        int id = int(c.queues.size());
        for (int k = 0; k < num; ++k) {
            int b = alloc(l, int(Q::emu_pos), emu::cat(q.name, "#", k));
            auto& bi = c.bufs[b];
            bi.queue = id;
            bi.state = emu::BufState::FREE;
            bi.prod = q.prod;
            bi.cons = q.cons;
            q.bufs.push_back(b);
        }
        c.queues.push_back(q);
        que.emu_id = id;
        return true;
    }
    template <TPosition p>
    bool InitBuffer(TBuf<p>& buf, uint32_t len) {
        if (buf.emu_id >= 0) emu::fail(emu::rule::USAGE, "InitBuffer called twice for one TBuf");
        buf.emu_id = alloc(round32(len), int(p), emu::cat("tbuf", emu::core().bufs.size()));
        return true;
    }
    void Reset() {}
    void Destroy() {}

    TEventID FetchEventID(HardEvent e) { return TEventID(next_id_[int(e)]++ % 8); }
    template <HardEvent e>
    TEventID FetchEventID() { return FetchEventID(e); }
    template <HardEvent e>
    TEventID AllocEventID() { return FetchEventID(e); }
    template <HardEvent e>
    void ReleaseEventID(TEventID) {}

private:
    static uint32_t round32(uint32_t len) { return (len + emu::BLOCK - 1) / emu::BLOCK * emu::BLOCK; }
    int alloc(uint32_t len, int pos, const std::string& name) {
        auto& c = emu::core();
        if (uint64_t(c.used) + len > emu::UB_SIZE)
            emu::fail(emu::rule::UB_OVERFLOW, emu::cat("InitBuffer of ", len, " bytes (rounded up to 32 B) with ", c.used,
                                                       " already in use exceeds the unified buffer of ", emu::UB_SIZE,
                                                       " bytes (192 KiB - 256 B)"));
        emu::BufInfo b;
        b.offset = c.used;
        b.len = len;
        b.pos = pos;
        b.name = name;
        c.used += len;
        c.bufs.push_back(b);
        return int(c.bufs.size()) - 1;
    }
    int next_id_[int(HardEvent::MAX) + 1] = {};
};

inline TPipe* GetTPipePtr() { return detail::current_pipe(); }

// ---------------------------------------------------------------- sync and block ids

template <HardEvent e>
inline void SetFlag(int32_t eventID) {
    auto pp = detail::event_pipes(e);
    emu::set_flag(int(e), pp.first, pp.second, eventID);
}
template <HardEvent e>
inline void WaitFlag(int32_t eventID) {
    auto pp = detail::event_pipes(e);
    emu::wait_flag(int(e), pp.first, pp.second, eventID);
}
template <pipe_t p>
inline void PipeBarrier() {
    emu::barrier(p == PIPE_ALL ? emu::P_COUNT : int(p));
}
inline int64_t GetBlockIdx() { return emu::launch_state().block_idx; }
inline int64_t GetBlockNum() { return emu::launch_state().block_num; }

}  // namespace AscendC
