"""asv suites for the models: ViG against timm's DeiT (images/s and peak memory).

On a CUDA machine: ViG-T / DeiT-T at 224 px (batch 128) and 1024 px (batch 8), bf16
autocast, inference and a training step (DESIGN.md §7, §8). On CPU the same code runs on
small inputs so that ``asv run --python=same --quick`` stays short. DeiT rows need timm.
``benchmarks/models_gpu.py`` (repository root) prints the full comparison table in one run.
"""

import importlib.util

import torch

#: "resolution x batch". The small point runs on CPU machines, the others on CUDA machines
#: (a point that does not belong to the machine is skipped in setup).
CPU_POINTS = ["64x2"]
GPU_POINTS = ["224x128", "1024x8"]
MODELS = ["vig_tiny"] + (["deit_tiny_patch16_224"] if importlib.util.find_spec("timm") else [])


def _device() -> str:
    # decided inside each benchmark process, never at import: asv's forkserver imports this
    # module once and forks, and CUDA must not be initialised before the fork
    return "cuda" if torch.cuda.is_available() else "cpu"


def _build(name, img_size, device):
    torch.manual_seed(0)
    if name.startswith("vig"):
        import vig

        return vig.create_model(name, img_size=img_size).to(device)
    import timm

    return timm.create_model(name, img_size=img_size).to(device)


class _Model:
    params = (MODELS, CPU_POINTS + GPU_POINTS, ["infer", "train"])
    param_names = ["model", "point", "mode"]
    timeout = 600

    def setup(self, name, point, mode):
        self.device = _device()
        if point not in (GPU_POINTS if self.device == "cuda" else CPU_POINTS):
            raise NotImplementedError(f"{point} is not benchmarked on {self.device}")
        img_size, batch = (int(v) for v in point.split("x"))
        self.model = _build(name, img_size, self.device).train(mode == "train")
        self.x = torch.randn(batch, 3, img_size, img_size, device=self.device)
        self.y = torch.randint(0, 1000, (batch,), device=self.device)
        self.amp = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4) if mode == "train" else None
        self.step = self._infer if mode == "infer" else self._train
        self.step()  # warm-up: kernel compilation, autotuning, allocator
        self._sync()

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _images_per_second(self, step, calls):
        """Images/s over ``calls`` calls of ``step`` (one batch each), synchronised around them."""
        import time

        self._sync()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        self._sync()
        return calls * self.x.shape[0] / (time.perf_counter() - start)

    def _infer(self):
        with torch.no_grad(), self.amp:
            self.model(self.x)

    def _train(self):
        with self.amp:
            loss = torch.nn.functional.cross_entropy(self.model(self.x).float(), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class ModelStep(_Model):
    """Time of one step and images/s (inference, or a training step with SGD)."""

    def time_step(self, name, point, mode):
        self.step()
        self._sync()

    def track_images_per_second(self, name, point, mode):
        return self._images_per_second(self.step, 3)

    track_images_per_second.unit = "images/s"


class GpuModelMemory(_Model):
    """Peak GPU memory of one step (CUDA machines only)."""

    def setup(self, name, point, mode):
        if _device() != "cuda":
            raise NotImplementedError("GPU memory is tracked on CUDA machines only")
        super().setup(name, point, mode)

    def track_peak_memory_mib(self, name, point, mode):
        torch.cuda.reset_peak_memory_stats()
        self.step()
        self._sync()
        return torch.cuda.max_memory_allocated() / 2**20

    track_peak_memory_mib.unit = "MiB"


class GpuModelGraphInference(_Model):
    """Images/s of inference replayed from a CUDA graph (CUDA machines only): the GPU-bound
    speed, without the host time eager steps spend launching kernels (``ModelStep`` includes
    it). ``benchmarks/models_gpu.py --compile-modes graph`` measures the same thing."""

    params = (MODELS, GPU_POINTS, ["infer"])

    def setup(self, name, point, mode):
        if _device() != "cuda":
            raise NotImplementedError("CUDA-graph replay is measured on CUDA machines only")
        super().setup(name, point, mode)
        from glakernels.bench import capture_cuda_graph

        # capture needs autocast's weight-cast cache off (the cast copies are part of the graph)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        self.graph = capture_cuda_graph(self._infer)
        self._sync()

    def track_images_per_second(self, name, point, mode):
        return self._images_per_second(self.graph.replay, 10)

    track_images_per_second.unit = "images/s"
