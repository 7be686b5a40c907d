"""Code shared by torch_ref and flax_impl that imports neither framework nor `configs`.

- `driver`: the run driver, one training loop for both stacks, and the `Backend` interface each
  stack implements (`torch_ref.train.TorchBackend`, `flax_impl.train.FlaxBackend`).
- `sampling`: the data plan: each step's examples and every random augmentation draw.
- `model_table`: the ResNets' depths, block kinds and stage widths.
- `recipe`: the recipe schema (`Recipe`), override parsing and validation.
- `schedules`: the learning-rate and momentum schedules, and when a torch scheduler steps.
- `readers`, `datasets`: NumPy readers of the on-disk formats, where each data set lives.
- `pil_transforms`: ImageNet preprocessing with PIL, pixel for pixel torchvision's.
- `shares`: how a batch or a data set is split among processes and replicas.
- `files`: atomic file writes (every record, picture and checkpoint is written with them).
- `records`, `console`, `plot`, `tensorboard`: the workdir record, the console lines, the PNGs
  (curves, confusion matrix, LR range test; `plot.Pictures` is a sink of the driver),
  TensorBoard event files.
- `lr_find`: the LR range test (torch-lr-finder's `range_test` and suggestion) for both stacks.
- `cli`, `errors`, `preemption`: the command line, one-line user errors, clean stops.

The test harness (the chaos checks, test data in the real formats) is `testkit`, and the
benchmarks' timer `benchmarks.timing`: neither is part of the library.
"""
