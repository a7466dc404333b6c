"""Methods that train a network on the tiles: the reference CNN and EfficientNet-Lite0 fine-tuned end to end."""

from __future__ import annotations

import numpy as np

from hevisum.methods.base import FitContext, Method, register_method


class _TileMethod(Method):
    uses_tiles = True
    network = ""  # a name of hevisum.models.factory.create_model

    def build(self, n_outputs: int, pretrained: bool = True):
        from hevisum.models.factory import create_model

        kwargs = {"pretrained": pretrained} if self.network == "effnet-lite0" else {}
        return create_model(self.network, n_outputs, **kwargs)

    def fit(self, X, Y, *, rows, groups, ctx: FitContext) -> "_TileMethod":
        import torch

        from hevisum.training import inner_validation, train_tile_model

        # the seed is set before the network is built, so its initial weights are the same on every run
        torch.manual_seed(ctx.seed)
        net = self.build(Y.shape[1])
        val = inner_validation(len(rows), ctx.seed)
        res = train_tile_model(net, ctx.tiles, rows[~val], rows[val], ctx.Y_fit, ctx.Y_raw[rows[val]],
                               self.cfg.train, seed=ctx.seed, device=ctx.device, progress=ctx.progress,
                               desc=ctx.desc or self.name, checkpoint=ctx.checkpoint)
        self._net = net
        self.log = res.log
        self.params = {"n_outputs": int(Y.shape[1]), "best_epoch": res.best_epoch,
                       "inner_val_spearman": res.best_score, "seconds": res.seconds}
        self.tensors = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                        for k, v in res.state_dict.items()}
        return self

    def restore(self) -> None:
        import torch

        net = self.build(int(self.params["n_outputs"]), pretrained=False)
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.tensors.items()}, strict=True)
        self._net = net.eval()

    def predict(self, X, *, rows, ctx: FitContext) -> np.ndarray:
        from hevisum.training import predict_tiles

        return predict_tiles(self._net, ctx.tiles, rows, batch_size=64, device=ctx.device,
                             precision=self.cfg.train.precision, tta=self.cfg.train.tta, progress=ctx.progress,
                             desc=ctx.desc or self.name)


@register_method
class ReferenceCNN(_TileMethod):
    name = "hevisum-cnn"
    summary = "the reference multi-branch CNN (VisionMLP_MultiTask), trained on the tiles"
    profiles = ("reference",)
    network = "hevisum-cnn"


@register_method
class EffNetFinetune(_TileMethod):
    name = "effnet-finetune"
    summary = "ImageNet EfficientNet-Lite0 fine-tuned end to end on the tiles"
    network = "effnet-lite0"
