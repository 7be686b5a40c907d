"""Code shared by torch_ref and flax_impl that imports neither framework.

- `errors`: `UserError`, the one exception type that becomes a one-line message and exit code 2.
- `recipe`: the recipe schema (`Recipe`), override parsing and validation.
- `readers`: NumPy readers of the on-disk formats (CIFAR pickles, IDX, ImageFolder listings).
- `records`: the workdir record (resolved config, JSON-lines metrics, environment).
- `cli`: the command-line parser both `train` entry points use.
- `schedules`: the learning-rate and momentum schedules as plain float functions of the step.
"""
