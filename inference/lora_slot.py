"""LoRAs on a compiled transformer without compiling again: one prepared adapter, the slot.

A compiled block's graph is guarded by the peft layers it runs through: a new adapter name, another
set of adapted layers, another rank, even another scale (peft hands it on as a Python float) each
make dynamo build new graphs for both block types, tens of seconds on a GPU, and past the recompile
limit the blocks run eager without a word. So a compiled transformer gets one adapter before it is
compiled, the way diffusers' hotswapping prepares one (``enable_lora_hotswap(target_rank=…)``, then
a first load, which makes peft pad the adapter to that rank and turn its scalings into tensors):

- the slot adapts **every** linear layer of the transformer at ``rank``, with zero weights, so any
  LoRA's layers are a subset of the slot's;
- a LoRA is *written into* the slot: each layer's A and B into the first rows/columns of the slot's
  (the rest zero: a zero-padded LoRA computes what the LoRA computes), layers the LoRA does not
  adapt zeroed, and each layer's scaling tensor filled with the prediction's scale times the layer's
  alpha / rank; nothing the graphs are guarded on changes, so no LoRA, scale or switch recompiles;
- with no LoRA the slot is switched off (peft's ``disable_adapters``): the base layer alone runs, a
  second graph per block type that the warm-up compiles, so a request without a LoRA never pays for
  the slot's matmuls.

What a LoRA file means is diffusers' reading of it, unchanged: it is loaded with
``load_lora_adapter`` into a *shape-only* copy of the transformer (its weights are zero-stride
views of one zero, no memory), and each adapted layer's A, B, bias and scaling are read off the peft
layers diffusers made there. Only where they are written differs from the eager path
(:class:`inference.lora.LoraManager` loads each LoRA as its own adapter when nothing is compiled):
the same LoRA gives the same pictures within float rounding (the padded matmuls sum in another
order).

A LoRA of a higher rank than the slot's makes the slot grow (to the next power of two, at most
``MAX_RANK``): the blocks' LoRA graphs compile once more, said in the log. A LoRA above
``MAX_RANK``, or one peft applies by another method (DoRA), is refused in words.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .errors import LoraError

log = logging.getLogger(__name__)

SLOT = "slot"  # the one adapter name on a compiled transformer
READING = "reading"  # the adapter name a LoRA is read under, on the shape-only copy
DEFAULT_RANK = 64  # the slot's rank at startup: FLUX.1 LoRAs are mostly rank 4 to 64
MAX_RANK = 256  # the slot grows no further: about 2.8 GB in bf16 over FLUX.1's linear layers


def _bad(description: str) -> LoraError:
    return LoraError.one("lora_weights", "lora", description)


@dataclass
class SlotLora:
    """One LoRA as the slot takes it: per adapted layer its A [r, in], B [out, r], B's bias (or None)
    and its scaling at scale 1 (alpha / r, as diffusers made it)."""

    layers: dict = field(default_factory=dict)  # module name -> (A, B, bias, scaling)

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _b, _bias, _s in self.layers.values()), default=0)


class LoraSlot:
    """The slot on one transformer: prepared before the transformer is compiled, written per LoRA."""

    @classmethod
    def on(cls, transformer, rank: int = DEFAULT_RANK) -> "LoraSlot":
        """``transformer``'s slot: the one it has (a transformer is prepared once), or a new one."""
        slot = getattr(transformer, "_lora_slot", None)
        if slot is None:
            slot = transformer._lora_slot = cls(transformer, rank)
        slot.clear()
        return slot

    def __init__(self, transformer, rank: int = DEFAULT_RANK):
        import torch

        self.transformer = transformer
        self.rank = rank
        linears = [(name, module) for name, module in transformer.named_modules()
                   if isinstance(module, torch.nn.Linear)]
        state = {}
        for name, module in linears:
            weight = module.weight
            dtype = weight.dtype if weight.dtype.is_floating_point and weight.element_size() > 1 else self._dtype()
            state[f"{name}.lora_A.weight"] = torch.zeros(rank, module.in_features, device=weight.device, dtype=dtype)
            state[f"{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, device=weight.device, dtype=dtype)
            state[f"{name}.lora_B.bias"] = torch.zeros(module.out_features, device=weight.device, dtype=dtype)
        # diffusers' own preparation for hotswapping: after this first load, peft pads the adapter to
        # ``rank`` (already its rank here) and turns every scaling into a tensor.
        transformer.enable_lora_hotswap(target_rank=rank)
        transformer.load_lora_adapter(state, adapter_name=SLOT, prefix=None)
        del state
        self.layers = {name: transformer.get_submodule(name) for name, _module in linears}
        for layer in self.layers.values():
            layer.scaling[SLOT].fill_(0.0)
        self.transformer.requires_grad_(False)
        self.current: SlotLora | None = None  # what the slot holds
        self.enabled = True
        self.disable()

    def _dtype(self):
        """The compute dtype: what the transformer's embedders (never quantised) hold."""
        return self.transformer.x_embedder.weight.dtype

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for layer in self.layers.values()
                   for p in (*layer.lora_A[SLOT].parameters(), *layer.lora_B[SLOT].parameters()))

    # -- reading a LoRA ---------------------------------------------------------------------------

    def read(self, state: dict, alphas: dict | None, metadata: dict | None, name: str) -> SlotLora:
        """The LoRA layers of ``state`` (diffusers' names under ``transformer.``, as
        ``FluxFillPipeline.lora_state_dict`` gives them) as diffusers would load them, on the devices
        and in the dtypes of the slot."""
        from diffusers import FluxFillPipeline
        from peft.tuners.lora import LoraLayer

        lora_state = {k: v for k, v in state.items() if ".lora_" in k}
        if not lora_state:
            return SlotLora()
        shadow = _shape_only_copy(self.transformer, self._dtype())
        # Fill's x_embedder reads more channels than FLUX.1 [dev]'s: diffusers zero-pads the A matrix.
        lora_state = FluxFillPipeline._maybe_expand_lora_state_dict(transformer=shadow, lora_state_dict=lora_state)
        shadow.load_lora_adapter(lora_state, network_alphas=alphas or None, metadata=metadata,
                                 adapter_name=READING, prefix="transformer")
        out = SlotLora()
        for module_name, module in shadow.named_modules():
            if not isinstance(module, LoraLayer) or READING not in module.lora_A:
                continue
            if module.use_dora.get(READING):
                raise _bad(f"{name} is a DoRA (weight-decomposed LoRA), which this server applies only without "
                           "compiled blocks; start it with --no-compile to use this file")
            slot = self.layers[module_name]
            device = slot.lora_A[SLOT].weight.device
            dtype = slot.lora_A[SLOT].weight.dtype
            a = module.lora_A[READING].weight.detach().to(device=device, dtype=dtype)
            b = module.lora_B[READING].weight.detach().to(device=device, dtype=dtype)
            bias = module.lora_B[READING].bias
            bias = None if bias is None else bias.detach().to(device=device, dtype=dtype)
            scaling = module.scaling[READING]
            out.layers[module_name] = (a, b, bias, float(scaling))
        del shadow
        if out.rank > MAX_RANK:
            raise _bad(f"{name} has rank {out.rank}, more than the {MAX_RANK} this server's compiled blocks take; "
                       "start it with --no-compile to use this file (LoRAs of any rank then apply, more slowly)")
        return out

    # -- per prediction ---------------------------------------------------------------------------

    def put(self, lora: SlotLora, scale: float, log_line=None) -> None:
        """``lora`` at ``scale`` in the slot, switched on."""
        import torch

        if lora.rank > self.rank:
            self._grow(lora.rank, log_line)
        with torch.no_grad():
            if self.current is not lora:  # another LoRA: its weights in, the rest zero
                for name, layer in self.layers.items():
                    a_slot, b_slot = layer.lora_A[SLOT].weight, layer.lora_B[SLOT].weight
                    bias_slot = layer.lora_B[SLOT].bias
                    entry = lora.layers.get(name)
                    if entry is None:
                        if self.current is None or name in self.current.layers:  # not zero yet
                            for tensor in (a_slot, b_slot, bias_slot):
                                tensor.zero_()
                        continue
                    a, b, bias, _scaling = entry
                    r = a.shape[0]
                    a_slot[:r].copy_(a)
                    a_slot[r:].zero_()
                    b_slot[:, :r].copy_(b)
                    b_slot[:, r:].zero_()
                    if bias is None:
                        bias_slot.zero_()
                    else:
                        bias_slot.copy_(bias)
                self.current = lora
            for name, layer in self.layers.items():  # the scale, every time: tensors, so no graph sees it
                entry = lora.layers.get(name)
                layer.scaling[SLOT].fill_(scale * entry[3] if entry is not None else 0.0)
        self.enable()

    def enable(self) -> None:
        if not self.enabled:
            for layer in self.layers.values():
                layer.enable_adapters(True)
            self._freeze()
            self.enabled = True

    def disable(self) -> None:
        """The base layers alone, as if there were no slot."""
        if self.enabled:
            for layer in self.layers.values():
                layer.enable_adapters(False)
            self.enabled = False

    def clear(self) -> None:
        """Switched off and emptied."""
        import torch

        self.disable()
        with torch.no_grad():
            for layer in self.layers.values():
                for param in (*layer.lora_A[SLOT].parameters(), *layer.lora_B[SLOT].parameters()):
                    param.zero_()
                layer.scaling[SLOT].fill_(0.0)
        self.current = None

    def remove(self) -> None:
        """Take the slot off the transformer (its base layers back, as loaded): for a benchmark that
        measures the transformer without it afterwards. The compiled blocks' graphs no longer fit."""
        self.clear()
        self.transformer.unload_lora()
        self.transformer._lora_slot = None
        self.layers = {}

    def _freeze(self) -> None:
        """peft makes an adapter it switches on trainable; a graph is guarded on that, and nothing here trains."""
        for layer in self.layers.values():
            layer.lora_A[SLOT].requires_grad_(False)
            layer.lora_B[SLOT].requires_grad_(False)

    def _grow(self, rank: int, log_line=None) -> None:
        """A larger slot for a LoRA of a higher rank: the LoRA graphs compile once more."""
        import torch

        new = min(MAX_RANK, 1 << (rank - 1).bit_length())
        before = self.nbytes()
        with torch.no_grad():
            for layer in self.layers.values():
                a_module, b_module = layer.lora_A[SLOT], layer.lora_B[SLOT]
                a, b = a_module.weight, b_module.weight
                a_module.weight = torch.nn.Parameter(a.new_zeros(new, a.shape[1]), requires_grad=False)
                b_module.weight = torch.nn.Parameter(b.new_zeros(b.shape[0], new), requires_grad=False)
                a_module.out_features = b_module.in_features = new
                layer.r[SLOT] = new
        self.current = None  # everything is written again
        message = (f"a LoRA of rank {rank} is above the {self.rank} the compiled blocks were prepared for: the LoRA "
                   f"slot grows to rank {new} ({(self.nbytes() - before) / 1024**3:.2f} GiB more) and the blocks "
                   "compile once more for it (seconds to a minute on a GPU)")
        log.warning(message)
        if log_line is not None:
            log_line(f"The compiled blocks compile once more for a LoRA of rank {rank} (above {self.rank})")
        self.rank = new


def _shape_only_copy(transformer, dtype):
    """A FluxTransformer2DModel of ``transformer``'s config whose every tensor is a zero-stride view of
    one zero in ``dtype`` on the CPU: its shapes are the real ones, it holds no memory, and diffusers
    and peft can load a LoRA into it as into the real one."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        shadow = FluxTransformer2DModel.from_config(transformer.config)
    zero = torch.zeros((), dtype=dtype)
    for module in shadow.modules():
        for key, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[key] = torch.nn.Parameter(zero.expand(param.shape), requires_grad=False)
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = zero.expand(buffer.shape)
    return shadow.eval()
