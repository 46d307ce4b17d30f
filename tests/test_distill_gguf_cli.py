"""Issue 11's whole path from the command line: a GGUF expert pair (Q8_0 where the layer's width allows, as the
ComfyUI-GGUF layout), the distill LoRA pair on top (one LoRA per expert), preset fast: 4 single-pass steps; the LoRAs
reach the packed experts after dequantisation (the output moves; at strength 0 it is bit-identical to no LoRA), and
the experts stay packed."""

import torch
from safetensors.torch import load_file

from bernini_core.cli import main
from bernini_core.keymaps.wan_dit import dit_key_to_original
from bernini_core.loaders import load_renderer
from bernini_core.renderer.transformer import BerniniDiT
from gguf_files import Q, quantize, write_gguf
from lora_files import low_rank, write


def write_expert(path, dit):
    """The expert as a GGUF file: 2-D weights whose rows split into Q8_0 blocks packed, the rest F32."""
    tensors, metadata = {}, {}
    for key, value in dit.state_dict().items():
        name, array = dit_key_to_original(key), value.float().numpy()
        if array.ndim == 5:
            metadata[f"comfy.gguf.orig_shape.{name}"] = array.shape
            tensors[name] = (array.reshape(array.shape[0], -1), Q.F32)
        elif array.ndim == 2 and array.shape[1] % 32 == 0 and ".modulation" not in name:
            tensors[name] = (quantize(array, Q.Q8_0), Q.Q8_0)
        else:
            tensors[name] = (array, Q.F32)
    assert any(qtype == Q.Q8_0 for _, qtype in tensors.values())
    return str(write_gguf(path, tensors, metadata=metadata))


def test_gguf_experts_with_the_distill_lora_pair_in_four_steps(tiny_renderer_dir, tmp_path, monkeypatch):
    source = load_renderer(tiny_renderer_dir, dtype=torch.float32, parts="experts")
    high, low = (write_expert(tmp_path / f"{n}.gguf", dit) for n, dit in (("high", source.dit_high),
                                                                          ("low", source.dit_low)))
    lora_high = write(tmp_path / "distill_high.safetensors",
                      low_rank(source.dit_high, "comfy", ("q", "ffn", "head"), rank=4, alpha=4.0, seed=1)[0])
    lora_low = write(tmp_path / "distill_low.safetensors",
                     low_rank(source.dit_high, "comfy", ("q", "o2", "head"), rank=4, alpha=4.0, seed=2)[0])
    base = ["generate", "--config", str(tiny_renderer_dir), "--high_noise_ckpt", high, "--low_noise_ckpt", low,
            "--task_type", "t2v", "--prompt", "a fox", "--num_frames", "5", "--height", "32", "--width", "32",
            "--preset", "fast", "--device", "cpu", "--dtype", "fp32", "--quiet", "--overwrite",
            "--output", str(tmp_path / "out.mp4")]
    forwards, packed = [], []
    original = BerniniDiT.forward

    def counting(self, *args, **kwargs):
        forwards.append(float(args[2].reshape(-1)[0]))
        packed.append(sum(getattr(m, "bernini_quantized", False) for m in self.modules()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BerniniDiT, "forward", counting)

    def latents(*flags, name):
        forwards.clear()
        path = tmp_path / f"{name}.safetensors"
        assert main(base + ["--save_latents", str(path), *flags]) == 0
        return next(iter(load_file(str(path)).values()))

    plain = latents(name="plain")
    assert [round(t, 2) for t in forwards] == [1000.0, 937.5, 833.33, 625.0]  # 4 steps, one pass each
    assert min(packed) > 0  # the experts compute from packed Q8_0 bytes
    distilled = latents("--lora", f"{lora_high}:1:high", "--lora", f"{lora_low}:1:low", name="distilled")
    off = latents("--lora", f"{lora_high}:0:high", "--lora", f"{lora_low}:0:low", name="off")
    assert torch.isfinite(distilled).all() and (distilled - plain).abs().max() > 1e-3
    assert torch.equal(off, plain)
