"""How merge operators run: the kernel seam (`select`), the compiled and chunked kernels by role,
and the non-finite check of merged tensors.

- `select`: picks, per tensor, the first of the operator's declared kernels that takes it.
- `disk`, `memory`: the streaming engine's and the trial merger's kernels (what `select` calls).
- `inputs`: a job's inputs read slice by slice (disk, the trial cache as stored or as float32
  task vectors), the scratch `Workspace`, the top-k `CutRule`, the output sinks.
- `chunked`: the slice-by-slice merge of linear and the task-vector family (torch or compiled
  per slice); `taskvec_torch`: each row's sparsification (`prepare_row`, `Row.apply_`);
  `cached`: the trial merger's whole-tensor compiled passes.
- `jit_core` (numba availability, intrinsics, shared inlined helpers, probes), `jit_linear`,
  `jit_taskvec`, `jit_topk`, `jit_dare`, `jit_dare16`, `mt19937`, `counter_jit`: the compiled
  loops (numba, the `fast` extra), each module compiling its own on first use.
- `finite`: the inf/NaN check.
"""
