"""Code shared by torch_ref and flax_impl that imports neither framework nor `configs`.

Flat on purpose (21 modules, ~230 lines each; a module's name says what it holds), read by role:

The run
- `driver`: the run driver, one training loop for both stacks (`Run.run_epoch`), and the
  `Backend` interface each stack implements (`torch_ref.train.TorchBackend`,
  `flax_impl.train.FlaxBackend`). Its docstring is the map of a run: start here.
- `cli`, `errors`, `preemption`, `console`: the command line, one-line user errors, clean stops
  (signals, pause points), the console lines.
- `records`, `files`: the workdir record (metrics, checkpoints' index, lock) and atomic file
  writes (every record, picture and checkpoint is written with them).

The data plan
- `sampling`: each step's examples and every random augmentation draw, keyed by (seed, epoch, step).
- `regularisers`: Cutout, MixUp, CutMix and label smoothing, drawn once for both stacks.
- `shares`: how a batch or a data set is split among processes and replicas.
- `readers`, `datasets`: NumPy readers of the on-disk formats, where each data set lives.
- `pil_transforms`: ImageNet preprocessing with PIL, pixel for pixel torchvision's, and the one
  image decoder every pipeline uses.

The recipe
- `recipe`: the recipe schema (`Recipe`), override parsing and validation.
- `schedules`: the learning-rate and momentum schedules, and when a torch scheduler steps.
- `model_table`: the ResNets' depths, block kinds and stage widths.

Reports and tools
- `plot`, `tensorboard`: the PNGs (curves, confusion matrix, LR range test; `plot.Pictures` is a
  sink of the driver) and TensorBoard event files.
- `lr_find`: the LR range test (torch-lr-finder's `range_test` and suggestion) for both stacks.
- `predict`: predict with a trained run, written once for both stacks.

The test harness (the chaos checks, test data in the real formats) is `testkit`, and the
benchmarks' timer `benchmarks.timing`: neither is part of the library.
"""
