// Soft-capped cross entropy of a block of logits and its gradient, one pass pair per row.
//
// The eager path (fused_loss.py) spends ~14 passes of separate torch kernels over each logit
// (cast, cap, softmax's three, two maxima, the cap's slope, casts back); this does the same math
// in two loops over a row that stays in cache, so a logit costs two exponentials and a few
// multiplies. Built at run time by cpu_loss_kernel.py with -march=native -ffast-math, which lets
// gcc vectorise std::exp through glibc's vector math library.
//
// For a row x with cap c and target t (s = sigmoid(2x/c), so c*tanh(x/c) = 2c*s - c):
//   z_j = 2c*s_j (the constant -c cancels in softmax), loss = logsumexp(z) - z_t
//   d loss / d x_j = (softmax(z)_j - [j == t]) * 4 s_j (1 - s_j)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(const float* p, int64_t j) { return p[j]; }
inline float load(const uint16_t* p, int64_t j) {  // bfloat16 -> float32 is exact: the top 16 bits
  uint32_t u = uint32_t(p[j]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t j, float g) { p[j] = g; }
inline void store(uint16_t* p, int64_t j, float g) {  // float32 -> bfloat16, round to nearest even
  uint32_t u;
  std::memcpy(&u, &g, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  p[j] = uint16_t(u >> 16);
}

// One row: its loss, and the row overwritten with the loss's gradient. s and e: vocab floats of scratch.
template <typename T>
float capped_row(T* __restrict__ row, int64_t target, int64_t vocab, float cap, float* __restrict__ s,
                 float* __restrict__ e) {
  const float k = 2.0f / cap, two_c = 2.0f * cap;
  // Any shift >= max(z) keeps exp from overflowing. z = 2c*s never exceeds 2c, and for caps up to
  // 20 even exp(-4c) stays a normal float32, so 2c itself will do and saves a pass; larger caps
  // shift by the row's largest z (sigmoid is increasing: it comes from the largest logit).
  float z_max = two_c;
  if (cap > 20.0f) {
    float x_max = load(row, 0);
    for (int64_t j = 1; j < vocab; ++j) x_max = std::max(x_max, load(row, j));
    z_max = two_c / (1.0f + std::exp(-k * x_max));
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < vocab; ++j) {
    const float sj = 1.0f / (1.0f + std::exp(-k * load(row, j)));
    s[j] = sj;
    e[j] = std::exp(two_c * sj - z_max);
    sum += e[j];
  }
  const int64_t t = std::max<int64_t>(target, 0);  // ignored rows (-1) get weight 0 later
  const float loss = z_max + std::log(sum) - two_c * s[t];
  const float scale = 4.0f / sum;
  for (int64_t j = 0; j < vocab; ++j) store(row, j, e[j] * scale * s[j] * (1.0f - s[j]));
  store(row, t, (e[t] / sum - 1.0f) * 4.0f * s[t] * (1.0f - s[t]));
  return loss;
}

template <typename T>
void capped_rows(T* x, const int64_t* targets, float* losses, int64_t rows, int64_t vocab, float cap) {
  // OpenMP directly (torch's own runtime, already loaded): inside at::parallel_for's lambda gcc
  // stopped vectorising the row loops, which made the kernel 8x slower.
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> s(vocab), e(vocab);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) losses[r] = capped_row(x + r * vocab, targets[r], vocab, cap, s.data(), e.data());
  }
}

}  // namespace

// Per-row losses (float32) of logits (rows, vocab), float32 or bfloat16, which are overwritten
// in place with d loss_row / d logits.
torch::Tensor capped_cross_entropy_(torch::Tensor logits, torch::Tensor targets, double cap) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(),
              "logits must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) && targets.scalar_type() == torch::kLong,
              "targets must be int64 with one entry per row");
  auto targets_c = targets.contiguous();
  auto losses = torch::empty({logits.size(0)}, logits.options().dtype(torch::kFloat));
  const auto rows = logits.size(0), vocab = logits.size(1);
  if (logits.scalar_type() == torch::kBFloat16) {
    capped_rows(reinterpret_cast<uint16_t*>(logits.data_ptr()), targets_c.data_ptr<int64_t>(),
                losses.data_ptr<float>(), rows, vocab, float(cap));
  } else {
    TORCH_CHECK(logits.scalar_type() == torch::kFloat, "logits must be float32 or bfloat16");
    capped_rows(logits.data_ptr<float>(), targets_c.data_ptr<int64_t>(), losses.data_ptr<float>(), rows, vocab,
                float(cap));
  }
  return losses;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("capped_cross_entropy_", &capped_cross_entropy_, "soft-capped cross entropy and its gradient, in place");
}
