"""The nerf-pytorch library: everything behind `run_nerf.py` and the other programs at the top level.

One concern a module:

- rendering: volume rendering (`render`, `render_rays`, `raw2outputs`, `render_path`)
- fast_mlp: the fused evaluation of `run_nerf_helpers.NeRF` and its encoders
- ray_batches: where each training step's rays come from
- geometry: NDC and back, depth along the viewing axis
- checkpoints: checkpoint files, safe loading, exact-resume state
- outputs: run files written whole or not at all
- parallel: data-parallel training under torchrun
- flags, data_checks, run_folder: checks of the flags, the data folder and the run folder before any heavy work
- datasets: from flags to a loaded scene
- load_transforms, undistort, sparse_points: capture tools' transforms.json (`--dataset_type nerfstudio`); lens distortion and undistortion; sparse points (PLY) and their bounds
- metrics, lpips_vgg, scoring: PSNR and SSIM, LPIPS, a test set's scores and `metrics.json`
- colmap_model: reading COLMAP models, converting them to poses_bounds.npy and transforms.json
- demo_scene: the built-in analytic demo scene
- viewer: the live web viewer (viser)
- camera_path: camera paths in nerfstudio's format, OpenGL and OpenCV camera conventions
- errors: the one-line errors the programs print
- omp_wait: OpenMP's threads wait passively unless the user chose (imported by every program before torch)
"""
