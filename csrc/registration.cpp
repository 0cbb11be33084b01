// Every op schema of the lambdapo namespace, in one place. Kernels are registered per
// backend in csrc/cpu and csrc/cuda.
//
// validate=False trusts the values of the inputs (target and id ranges, finiteness,
// offsets): the op then reads nothing back from the device, so it makes no host
// synchronisation and can be captured in a CUDA graph. Shape, dtype and device checks,
// which need no sync, always run.
#include <torch/library.h>

TORCH_LIBRARY(lambdapo, m) {
  m.def(
      "lambda_advantages(Tensor rewards, Tensor scores, Tensor? mask, Tensor? group_ids, "
      "float beta, str normalize, float eps, bool validate=True) -> Tensor");
  // Returns (logprobs, entropy, lse); entropy is empty unless return_entropy.
  // inplace_backward only tells the autograd formula which backward to call.
  m.def(
      "token_logprobs_forward(Tensor logits, Tensor targets, float temperature, "
      "int ignore_index, bool return_entropy, bool inplace_backward, bool validate=True) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor targets, Tensor lse, Tensor entropy, float temperature, int ignore_index, "
      "bool validate=True) -> Tensor");
  // Writes dlogits over logits.
  m.def(
      "token_logprobs_backward_inplace(Tensor grad_logprobs, Tensor? grad_entropy, "
      "Tensor(a!) logits, Tensor targets, Tensor lse, Tensor entropy, float temperature, "
      "int ignore_index, bool validate=True) -> ()");
  // Over tiles of chunk_size rows x vocab_chunk_size vocabulary entries (one tile of
  // logits at a time): returns (logprobs, entropy, lse) and (grad_hidden, grad_weight,
  // grad_bias); a gradient left out of output_mask (or grad_bias without bias) is empty.
  m.def(
      "linear_token_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor targets, float temperature, int ignore_index, bool return_entropy, "
      "int chunk_size, int vocab_chunk_size, bool validate=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, "
      "Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, "
      "float temperature, int ignore_index, int chunk_size, int vocab_chunk_size, "
      "bool[3] output_mask, bool validate=True, bool unrounded_grad_hidden=False) "
      "-> (Tensor, Tensor, Tensor)");
  // The policy loss of the lm-head's logits with its gradient made in the forward, over
  // row chunks of chunk_size rows (csrc/linear_policy_loss.h): returns (loss, logprobs,
  // entropy, grad_hidden, grad_weight, grad_bias) for an upstream gradient of 1; a gradient
  // left out of output_mask (or grad_bias without bias) is empty. kl_coef != 0 needs ref.
  m.def(
      "linear_policy_loss_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor advantages, Tensor token_weights, Tensor? old_logprobs, Tensor? ref_logprobs, "
      "float kl_coef, float entropy_coef, float clip_low, float clip_high, float temperature, "
      "int ignore_index, int chunk_size, bool[3] output_mask, bool validate=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Semantic density: candidate i is cand_values[cand_starts[i] : + cand_lengths[i]],
  // compared with reference ref_index[i] (same layout). ngram_overlap returns
  // (clipped matches, candidate n-gram counts, reference n-gram counts), each [B, max_n];
  // lcs_length (LCS, candidate length, reference length), each [B]. With validate=False the
  // sequences are clipped to their values and an out-of-range ref_index means an empty
  // reference (csrc/sequence_overlap.h); the counts and lengths are those of the clipped
  // sequences.
  m.def(
      "ngram_overlap(Tensor cand_values, Tensor cand_starts, Tensor cand_lengths, "
      "Tensor ref_values, Tensor ref_starts, Tensor ref_lengths, Tensor ref_index, "
      "int max_n, bool validate=True) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lcs_length(Tensor cand_values, Tensor cand_starts, Tensor cand_lengths, "
      "Tensor ref_values, Tensor ref_starts, Tensor ref_lengths, Tensor ref_index, "
      "bool validate=True) -> (Tensor, Tensor, Tensor)");
}
