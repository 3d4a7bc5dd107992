// A float32 matmul for a few rows on x86 CPUs with AVX-512, called from XLA through its FFI.
//
// XLA's CPU matmul reads a large weight matrix at about half its one-row speed when it multiplies it by
// 2-16 rows (beam search's LM head over 54,944 tokens is the case that matters). This one streams the
// weights once, in a layout packed for it, and keeps every row's partial sums in registers, so ten rows
// cost about what one row costs: the time to read the weights.
//
// out [M, N] = x [M, K] @ w + bias [N], with w packed as panels [P, K, 32]: panel p holds columns
// 32p .. 32p + 31 (zero beyond N), each k's 32 values contiguous. The panels are split between XLA's intra-op threads.
// Sums run over k in order with fused multiply-adds.
//
// Built as the extension module `bbsmall_jax._cpu_kernels`; it exports the handler as a capsule and
// whether this CPU can run it.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;    // columns per panel: two 16-float vectors
constexpr int kMaxRows = 12;      // rows per register block: 24 accumulators of the 32 vector registers
constexpr int64_t kPrefetch = 32; // k steps ahead to prefetch within a panel (4 KiB)

#if defined(__x86_64__) && defined(__GNUC__)
#define KERNEL_TARGET __attribute__((target("avx512f,fma")))
constexpr bool kCompiled = true;
#else
#define KERNEL_TARGET
constexpr bool kCompiled = false;
#endif

typedef float Vec16 __attribute__((vector_size(64), aligned(4)));

struct Job {
  const float* x;   // [M, K]
  const float* w;   // [P, K, 32]
  const float* bias;  // [N]
  float* out;       // [M, N]
  int64_t rows, depth, columns, panels, panels_per_chunk, chunks;
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> done_chunks{0};
};

// R rows times one panel: out[r, 32p .. 32p + 31] for r < R, all partial sums in registers.
template <int R>
KERNEL_TARGET inline __attribute__((always_inline)) void RowBlock(const float* x, int64_t depth,
                                                                  const float* panel, const float* bias,
                                                                  float* out, int64_t out_stride,
                                                                  int64_t width) {
  Vec16 low[R], high[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) low[r] = high[r] = Vec16{};
  for (int64_t k = 0; k < depth; ++k) {
    const float* wk = panel + k * kPanel;
    __builtin_prefetch(wk + kPrefetch * kPanel, 0, 2);
    __builtin_prefetch(wk + kPrefetch * kPanel + 16, 0, 2);
    const Vec16 w_low = *reinterpret_cast<const Vec16*>(wk);
    const Vec16 w_high = *reinterpret_cast<const Vec16*>(wk + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * depth + k];
      low[r] += xv * w_low;
      high[r] += xv * w_high;
    }
  }
  if (width == kPanel) {
    const Vec16 b_low = *reinterpret_cast<const Vec16*>(bias);
    const Vec16 b_high = *reinterpret_cast<const Vec16*>(bias + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      *reinterpret_cast<Vec16*>(out + r * out_stride) = low[r] + b_low;
      *reinterpret_cast<Vec16*>(out + r * out_stride + 16) = high[r] + b_high;
    }
    return;
  }
  for (int r = 0; r < R; ++r) {  // the last, partial panel
    float sums[kPanel];
    std::memcpy(sums, &low[r], sizeof(Vec16));
    std::memcpy(sums + 16, &high[r], sizeof(Vec16));
    for (int64_t j = 0; j < width; ++j) out[r * out_stride + j] = sums[j] + bias[j];
  }
}

// Every row times one panel, in blocks of at most kMaxRows rows.
KERNEL_TARGET void Panel(const Job& job, int64_t p) {
  const float* panel = job.w + p * job.depth * kPanel;
  const int64_t width = std::min(kPanel, job.columns - p * kPanel);
  for (int64_t r0 = 0; r0 < job.rows; r0 += kMaxRows) {
    const float* x = job.x + r0 * job.depth;
    float* out = job.out + r0 * job.columns + p * kPanel;
    switch (std::min<int64_t>(kMaxRows, job.rows - r0)) {
#define BLOCK(n) \
  case n:        \
    RowBlock<n>(x, job.depth, panel, job.bias + p * kPanel, out, job.columns, width); \
    break;
      BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4) BLOCK(5) BLOCK(6)
      BLOCK(7) BLOCK(8) BLOCK(9) BLOCK(10) BLOCK(11) BLOCK(12)
#undef BLOCK
    }
  }
}

// Claim chunks of panels until none is left (run by the caller and by each scheduled task).
void Work(Job& job) {
  int64_t chunk;
  while ((chunk = job.next_chunk.fetch_add(1)) < job.chunks) {
    const int64_t end = std::min(job.panels, (chunk + 1) * job.panels_per_chunk);
    for (int64_t p = chunk * job.panels_per_chunk; p < end; ++p) Panel(job, p);
    job.done_chunks.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error SmallRowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                               ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out) {
  const auto w_dims = w.dimensions();
  const auto out_dims = out->dimensions();
  if (w_dims.size() != 3 || w_dims[2] != kPanel) {
    return ffi::Error::InvalidArgument("small_rows_matmul: packed weights must be [panels, K, 32]");
  }
  const int64_t depth = w_dims[1], panels = w_dims[0];
  const auto x_dims = x.dimensions();
  if (x_dims.size() < 1 || x_dims[x_dims.size() - 1] != depth || out_dims.size() < 1) {
    return ffi::Error::InvalidArgument("small_rows_matmul: x's last axis must match the packed K");
  }
  const int64_t columns = out_dims[out_dims.size() - 1];
  if (columns == 0) return ffi::Error::Success();
  const int64_t rows = out->element_count() / columns;
  if (columns <= (panels - 1) * kPanel || columns > panels * kPanel || x.element_count() != rows * depth) {
    return ffi::Error::InvalidArgument("small_rows_matmul: output shape does not match the inputs");
  }
  if (bias.element_count() != columns) {
    return ffi::Error::InvalidArgument("small_rows_matmul: bias must have one entry per output column");
  }
  if (rows == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->bias = bias.typed_data();
  job->out = out->typed_data();
  job->rows = rows;
  job->depth = depth;
  job->columns = columns;
  job->panels = panels;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->panels_per_chunk = std::max<int64_t>(1, panels / (threads * 8));
  job->chunks = (panels + job->panels_per_chunk - 1) / job->panels_per_chunk;
  // The caller works too, so one fewer task than threads; a task that starts late finds nothing left
  // and only drops its reference to the job.
  for (int64_t t = 1; t < std::min(threads, job->chunks); ++t) pool.Schedule([job] { Work(*job); });
  Work(*job);
  while (job->done_chunks.load(std::memory_order_acquire) < job->chunks) {
    std::this_thread::yield();  // the chunks other threads claimed; let them have the core if it is shared
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BbsmallSmallRowsMatmul, SmallRowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

static int CpuSupported() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return kCompiled && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
  return 0;
#endif
}

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                              "XLA FFI handlers for bbsmall_jax's CPU kernels.", -1, nullptr};

PyMODINIT_FUNC PyInit__cpu_kernels(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  PyObject* handler = PyCapsule_New(reinterpret_cast<void*>(&BbsmallSmallRowsMatmul), nullptr, nullptr);
  if (handler == nullptr || PyModule_AddObject(module, "small_rows_matmul", handler) < 0 ||
      PyModule_AddIntConstant(module, "cpu_supported", CpuSupported()) < 0) {
    Py_XDECREF(handler);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
