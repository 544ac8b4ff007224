"""asv suites for the models: ViG against timm's DeiT (images/s and peak memory).

On a CUDA machine: ViG-T / DeiT-T at 224 px (batch 128) and 1024 px (batch 8), bf16
autocast, inference and a training step (DESIGN.md §7, §8). On CPU the same code runs on
small inputs so that ``asv run --python=same --quick`` stays short. DeiT rows need timm.
``benchmarks/models_gpu.py`` (repository root) prints the full comparison table in one run.
"""

import importlib.util

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
#: (resolution, batch) per device
POINTS = ["224x128", "1024x8"] if CUDA else ["64x2"]
MODELS = ["vig_tiny"] + (["deit_tiny_patch16_224"] if importlib.util.find_spec("timm") else [])


def _build(name, img_size):
    torch.manual_seed(0)
    if name.startswith("vig"):
        import vig

        return vig.create_model(name, img_size=img_size).to(DEVICE)
    import timm

    return timm.create_model(name, img_size=img_size).to(DEVICE)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


class ModelStep:
    params = (MODELS, POINTS, ["infer", "train"])
    param_names = ["model", "point", "mode"]
    timeout = 600

    def setup(self, name, point, mode):
        img_size, batch = (int(v) for v in point.split("x"))
        self.model = _build(name, img_size).train(mode == "train")
        self.x = torch.randn(batch, 3, img_size, img_size, device=DEVICE)
        self.y = torch.randint(0, 1000, (batch,), device=DEVICE)
        self.amp = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4) if mode == "train" else None
        self.step = self._infer if mode == "infer" else self._train
        self.step()  # warm-up: kernel compilation, autotuning, allocator
        _sync()

    def _infer(self):
        with torch.no_grad(), self.amp:
            self.model(self.x)

    def _train(self):
        with self.amp:
            loss = torch.nn.functional.cross_entropy(self.model(self.x).float(), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time_step(self, name, point, mode):
        self.step()
        _sync()

    def track_images_per_second(self, name, point, mode):
        import time

        batch = self.x.shape[0]
        _sync()
        start = time.perf_counter()
        for _ in range(3):
            self.step()
        _sync()
        return 3 * batch / (time.perf_counter() - start)

    track_images_per_second.unit = "images/s"

    def track_peak_memory_mib(self, name, point, mode):
        if not CUDA:
            return float("nan")
        torch.cuda.reset_peak_memory_stats()
        self.step()
        _sync()
        return torch.cuda.max_memory_allocated() / 2**20

    track_peak_memory_mib.unit = "MiB"
