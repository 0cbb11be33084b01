// Every op schema of the lambdapo namespace, in one place. Kernels are registered per
// backend in csrc/cpu and csrc/cuda.
#include <torch/library.h>

TORCH_LIBRARY(lambdapo, m) {
  m.def(
      "lambda_advantages(Tensor rewards, Tensor scores, Tensor? mask, Tensor? group_ids, "
      "float beta, str normalize, float eps) -> Tensor");
}
