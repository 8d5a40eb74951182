"""DeepSpeed ZeRO for the decoder fine-tune: the configs, and getting whole weights back out.

- ZeRO-2 partitions optimizer states and gradients; every worker still holds the full weights.
- ZeRO-3 also partitions the weights: a saved model needs them gathered first (`full_state_dict`).

- Offload (`offload`): "optimizer" keeps the fp32 master weights and Adam states in CPU memory
  and steps them there (stage 2 or 3); "all" also keeps the weights there between uses (stage 3).
  That is what a 70B full fine-tune needs on 8 x 80 GB (16 bytes per parameter of training
  state, 140 GB per GPU, against 2 + 2 with the optimizer offloaded).

On a GPU cluster the configs use bf16; on CPU (gloo) they stay fp32, which is what DeepSpeed's CPU
accelerator trains reliably. The optimizer is ours (torch AdamW; `zero_allow_untested_optimizer`
lets ZeRO wrap it, and DeepSpeed compiles no fused Adam), except with offload, where it is
DeepSpeed's CPU Adam (`offload_optimizer`), the AdamW that ZeRO-Offload steps on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch


def zero_config(
    stage: int,
    *,
    micro_batch_size: int,
    world_size: int,
    grad_accum: int = 1,
    gradient_clipping: float = 1.0,
    on_gpu: bool | None = None,
    offload: str = "none",
) -> dict[str, Any]:
    """A DeepSpeed config dict for ZeRO `stage` (2 or 3); `on_gpu` defaults to CUDA availability."""
    if stage not in (2, 3):
        raise ValueError(f"DeepSpeed ZeRO stage must be 2 or 3, not {stage}")
    if offload not in ("none", "optimizer", "all") or (offload == "all" and stage != 3):
        raise ValueError(f"offload {offload!r}: none, optimizer (stage 2/3) or all (stage 3)")
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": on_gpu,  # overlapping needs CUDA streams; on gloo it only adds threads
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if stage == 3:
        zero.update({
            "stage3_gather_16bit_weights_on_model_save": True,  # else ZeRO-3 saves no full weights
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 1e5,
        })
    cpu = {"device": "cpu", "pin_memory": on_gpu}  # pinned host memory: faster copies to a GPU
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = cpu
    if offload == "all":
        zero["offload_param"] = cpu
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": gradient_clipping,
        "bf16": {"enabled": on_gpu},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW, not DeepSpeed's (compiled) one
        "wall_clock_breakdown": False,
        "steps_per_print": 10**9,  # quiet; the training loop logs
    }


def offload_optimizer(params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ZeRO-Offload steps on the CPU: DeepSpeed's CPU AdamW (a C++ op that
    DeepSpeed compiles on first use, about a minute)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)


def full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The model's full weights on rank 0 (CPU tensors), None on the other ranks.

    Call it on every rank: under ZeRO-3 it gathers each layer's partitions (a collective). Under
    ZeRO-2 (or no ZeRO) every rank already holds the weights and rank 0 just copies them.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if engine.zero_optimization_partition_weights():  # ZeRO-3
        state = engine._zero3_consolidated_16bit_state_dict()
        return dict(state) if rank == 0 else None
    if rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}

