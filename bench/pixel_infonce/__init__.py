"""The pixel InfoNCE benchmark (`python -m bench.bench_pixel_infonce`), split by job:

- `inputs`: Cityscapes-like labels, groups and features for one cell;
- `providers`: the implementations measured (reference, tiled torch, Triton and its launch
  presets, torch.compile), each as a call that returns the (N,) loss;
- `runner`: one cell's passes timed and measured under the size and time guards;
- `report`: the results CSV's columns, the Markdown tables, the plot and the printed summaries;
- `standin`: the Triton path's memory around stand-in kernels, on a CPU.

`bench/bench_pixel_infonce.py` is the command line that ties them together; `bench/utils.py`
holds the plumbing every benchmark shares (stamps, one measured call, timing, the CSV).
"""
