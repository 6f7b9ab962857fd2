"""Train and test models described by configs, with PyTorch Lightning 2: the original ``main.py`` entry point.

    python main.py --base configs/toy-shapes/ldm.yaml -t lightning.trainer.max_steps=100

``--base`` configs are merged left to right, then ``key=value`` overrides (OmegaConf dotlist). A config has
``model`` (``target``, ``params``, ``base_learning_rate``), ``data`` (usually :class:`DataModuleFromConfig`) and
an optional ``lightning`` section (``trainer`` keyword arguments, ``callbacks``, ``modelcheckpoint``, ``logger``).
A run writes ``<logdir>/<timestamp>_<name><postfix>/`` with ``checkpoints/`` (``epoch=*.ckpt``, ``last.ckpt``,
state dicts keyed as the model), ``configs/`` (the merged project and lightning configs), ``images/`` (from the
model's ``log_images``) and CSV metrics. Ctrl-C (or SIGUSR1) saves ``checkpoints/last.ckpt``; ``--resume`` with
a log folder or a checkpoint continues from it. Nothing here uses the network.

Every checkpoint read here (``--resume``, ``model.params.ckpt_path``, and whatever Lightning restores) goes through
:func:`ldm.loading.checkpoint.read_checkpoint`, which never runs code from the file: a pickle that would import or call
anything is refused with one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.errors import LdmError, ModelNotFoundError
from ldm.loading.checkpoint import read_checkpoint
from ldm.util import instantiate_from_config

# Lightning's DDP launcher re-runs this script for ranks > 0; they reuse rank 0's timestamp (same log folder).
RUN_STAMP_ENV = "LDM_MAIN_RUN_STAMP"


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{value}'")


def get_parser() -> argparse.ArgumentParser:
    """The original's flags; anything else on the command line must be a ``key=value`` config override."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Extra arguments are key=value config overrides, e.g. "
                                            "lightning.trainer.max_steps=100 model.base_learning_rate=1e-4")
    parser.add_argument("-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for logdir")
    parser.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?",
                        help="resume from a log folder or a checkpoint in one")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                        help="paths to base configs, merged left to right; key=value arguments override them")
    parser.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    parser.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?", help="disable test")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="post-postfix for default name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory for the run folders")
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                        help="scale base_learning_rate by accumulate_grad_batches * devices * batch_size")
    return parser


# ---------------------------------------------------------------------------------------------------- data
class WrappedDataset(Dataset):
    """Wraps any object with ``__len__`` and ``__getitem__`` into a torch Dataset."""

    def __init__(self, dataset: Any):
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


def worker_init_fn(_: int) -> None:
    """Give each data-loader worker its own numpy seed (derived from torch's per-worker seed)."""
    np.random.seed(torch.initial_seed() % 2 ** 32)


class DataModuleFromConfig(pl.LightningDataModule):
    """Data loaders for the dataset configs ``train``, ``validation``, ``test``, ``predict`` (each optional)."""

    def __init__(self, batch_size: int, train: dict | None = None, validation: dict | None = None,
                 test: dict | None = None, predict: dict | None = None, wrap: bool = False,
                 num_workers: int | None = None, shuffle_test_loader: bool = False,
                 use_worker_init_fn: bool = False, shuffle_val_dataloader: bool = False):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        self.wrap = wrap
        self.dataset_configs = {name: cfg for name, cfg in
                                (("train", train), ("validation", validation), ("test", test), ("predict", predict))
                                if cfg is not None}
        # Lightning asks for a loader only where the hook exists: hide the hooks of splits without a config.
        if train is not None:
            self.train_dataloader = self._train_dataloader
        if validation is not None:
            self.val_dataloader = partial(self._eval_dataloader, "validation", shuffle=shuffle_val_dataloader)
        if test is not None:
            self.test_dataloader = partial(self._eval_dataloader, "test", shuffle=shuffle_test_loader)
        if predict is not None:
            self.predict_dataloader = partial(self._eval_dataloader, "predict", shuffle=False)
        self.datasets: dict[str, Dataset] = {}

    def has_split(self, name: str) -> bool:
        return name in self.dataset_configs

    def prepare_data(self) -> None:
        for cfg in self.dataset_configs.values():
            instantiate_from_config(cfg)

    def setup(self, stage: str | None = None) -> None:
        self.datasets = {name: instantiate_from_config(cfg) for name, cfg in self.dataset_configs.items()}
        if self.wrap:
            self.datasets = {name: WrappedDataset(ds) for name, ds in self.datasets.items()}

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[name]
        iterable = isinstance(dataset, IterableDataset)
        init_fn = worker_init_fn if (iterable or self.use_worker_init_fn) else None
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          shuffle=shuffle and not iterable, worker_init_fn=init_fn,
                          persistent_workers=self.num_workers > 0)

    def _train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def _eval_dataloader(self, name: str, shuffle: bool = False) -> DataLoader:
        return self._loader(name, shuffle=shuffle)


# ---------------------------------------------------------------------------------------------------- checkpoints
class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, reading through :func:`ldm.loading.checkpoint.read_checkpoint` (``weights_only``, the
    Lightning bookkeeping read as inert data) instead of a plain ``torch.load``; writing is Lightning's own."""

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        state_dict, extras = read_checkpoint(path)  # CheckpointError (one line) for a file that would run code
        return {**extras, "state_dict": state_dict}


def with_safe_checkpoint_io(plugins: Any) -> list:
    """``plugins`` (a Trainer argument) plus :class:`SafeCheckpointIO`, unless it names a CheckpointIO already."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(SafeCheckpointIO())
    return plugins


# ---------------------------------------------------------------------------------------------------- callbacks
def save_checkpoint_now(trainer: pl.Trainer, path: str | Path) -> None:
    """Write a full training checkpoint from rank 0 without a collective (safe inside signal/exception handlers)."""
    if trainer.global_rank != 0:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
    print(f"Saved checkpoint {path}")


class SetupCallback(Callback):
    """Creates the run folders and saves the merged configs (rank 0); saves ``last.ckpt`` on Ctrl-C (melk)."""

    def __init__(self, resume: str, now: str, logdir: str, ckptdir: str, cfgdir: str, config: DictConfig,
                 lightning_config: DictConfig):
        super().__init__()
        self.resume = resume
        self.now = now
        self.logdir = logdir
        self.ckptdir = ckptdir
        self.cfgdir = cfgdir
        self.config = config
        self.lightning_config = lightning_config
        self.save_requested = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank != 0:
            return
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(folder, exist_ok=True)
        if "callbacks" in self.lightning_config and \
                "metrics_over_trainsteps_checkpoint" in self.lightning_config.callbacks:
            os.makedirs(os.path.join(self.ckptdir, "trainstep_checkpoints"), exist_ok=True)
        OmegaConf.save(self.config, os.path.join(self.cfgdir, f"{self.now}-project.yaml"))
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))
        print(f"Logging to {self.logdir}")

    def melk(self, trainer: pl.Trainer) -> None:
        """Summon a checkpoint: ``checkpoints/last.ckpt``."""
        print("Summoning checkpoint.")
        save_checkpoint_now(trainer, os.path.join(self.ckptdir, "last.ckpt"))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.global_step > 0:
            self.melk(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.save_requested:  # SIGUSR1
            self.save_requested = False
            self.melk(trainer)


class ImageLogger(Callback):
    """Every ``batch_frequency`` steps (and at powers of two before that), saves the model's ``log_images``
    as PNG grids into ``<logdir>/images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png``."""

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: dict | None = None):
        super().__init__()
        if batch_frequency <= 0:
            raise ValueError(f"ImageLogger batch_frequency must be positive, got {batch_frequency}")
        self.rescale = rescale
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.log_steps = [2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)] if increase_log_steps \
            else [self.batch_freq]
        self.clamp = clamp
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_images_kwargs = dict(log_images_kwargs) if log_images_kwargs else {}
        self.log_first_step = log_first_step

    @rank_zero_only
    def log_local(self, save_dir: str, split: str, images: dict, global_step: int, current_epoch: int,
                  batch_idx: int) -> None:
        from PIL import Image
        from torchvision.utils import make_grid

        root = os.path.join(save_dir, "images", split)
        os.makedirs(root, exist_ok=True)
        for key, value in images.items():
            grid = make_grid(value, nrow=4)
            if self.rescale:
                grid = (grid + 1.0) / 2.0  # [-1, 1] -> [0, 1]
            grid = (grid.permute(1, 2, 0).squeeze(-1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            filename = f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(grid).save(os.path.join(root, filename))

    def check_frequency(self, check_idx: int) -> bool:
        if (check_idx % self.batch_freq == 0 or check_idx in self.log_steps) and (check_idx > 0 or
                                                                                    self.log_first_step):
            if self.log_steps:
                self.log_steps.pop(0)
            return True
        return False

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict, batch_idx: int,
                split: str = "train") -> None:
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if not (self.check_frequency(check_idx) and callable(getattr(pl_module, "log_images", None))
                and self.max_images > 0):
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        for key in list(images):
            if isinstance(images[key], torch.Tensor):
                images[key] = images[key][:self.max_images].detach().float().cpu()
                if self.clamp:
                    images[key] = images[key].clamp(-1.0, 1.0)
            else:
                del images[key]
        self.log_local(trainer.default_root_dir, split, images, pl_module.global_step, pl_module.current_epoch,
                       batch_idx)
        if was_training:
            pl_module.train()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.disabled and (pl_module.global_step > 0 or self.log_first_step):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.disabled and pl_module.global_step > 0 and not trainer.sanity_checking:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


# ---------------------------------------------------------------------------------------------------- setup
def resolve_resume(resume: str) -> tuple[str, str]:
    """``--resume`` (a log folder or a checkpoint file in ``<logdir>/checkpoints/``) -> (logdir, checkpoint)."""
    if not os.path.exists(resume):
        raise ModelNotFoundError(f"--resume {resume}: no such file or folder; pass a log folder or a checkpoint")
    if os.path.isfile(resume):
        ckpt = resume
        logdir = str(Path(resume).resolve().parent.parent)
    else:
        logdir = resume.rstrip("/")
        ckpt = os.path.join(logdir, "checkpoints", "last.ckpt")
        if not os.path.isfile(ckpt):
            raise ModelNotFoundError(f"--resume {resume}: {ckpt} does not exist; pass a checkpoint file instead")
    return logdir, ckpt


def trainer_kwargs_from_config(trainer_config: DictConfig) -> dict:
    """Lightning 2 ``Trainer`` keyword arguments; the Lightning 1 ``gpus: 0,1`` form is translated."""
    kwargs = OmegaConf.to_container(trainer_config, resolve=True)
    gpus = kwargs.pop("gpus", None)
    if gpus not in (None, 0, "", "0"):
        kwargs.setdefault("accelerator", "gpu")
        kwargs.setdefault("devices", [int(g) for g in str(gpus).strip(",").split(",")]
                          if isinstance(gpus, str) else gpus)
    kwargs.pop("resume_from_checkpoint", None)
    return kwargs


def parse_overrides(unknown: Sequence[str]) -> DictConfig:
    bad = [arg for arg in unknown if "=" not in arg or arg.startswith("-")]
    if bad:
        raise SystemExit(f"main.py: unknown argument {bad[0]}: pass config overrides as key=value, "
                         f"e.g. lightning.trainer.max_steps=100")
    overrides = OmegaConf.create()
    for arg in unknown:
        key, value = arg.split("=", 1)
        try:
            parsed = OmegaConf.from_dotlist([arg])
        except yaml.YAMLError as err:
            if not value.startswith("{"):
                problem = str(err).splitlines()[0]
                raise SystemExit(f"main.py: override {arg} is not valid YAML ({problem}); "
                                 "quote it to pass a string") from None
            parsed = OmegaConf.from_dotlist([f"{key}=x"])  # a format string such as "{epoch}-{step}": as typed
            OmegaConf.update(parsed, key, value, merge=False)
        one = OmegaConf.select(parsed, key)
        if isinstance(one, DictConfig) and len(one) and all(v is None for v in one.values()):
            OmegaConf.update(parsed, key, value, merge=False)  # "{step:06}" reads in YAML as {"step:06": None}
        overrides = OmegaConf.merge(overrides, parsed)
    return overrides


def default_callbacks(ckptdir: str, lightning_config: DictConfig, model: pl.LightningModule) -> DictConfig:
    """The original's default callbacks (image logger, learning-rate monitor, checkpoints), merged with
    ``lightning.callbacks`` and ``lightning.modelcheckpoint``."""
    modelckpt = {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "params": {"dirpath": ckptdir, "filename": "{epoch:06}", "verbose": True, "save_last": True}}
    if getattr(model, "monitor", None):
        print(f"Monitoring {model.monitor} as checkpoint metric.")
        modelckpt["params"]["monitor"] = model.monitor
        modelckpt["params"]["save_top_k"] = 3
    modelckpt = OmegaConf.merge(modelckpt, lightning_config.get("modelcheckpoint", OmegaConf.create()))
    callbacks = {
        "image_logger": {"target": "main.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "checkpoint_callback": modelckpt,
    }
    user = lightning_config.get("callbacks", OmegaConf.create())
    if "metrics_over_trainsteps_checkpoint" in user:
        callbacks["metrics_over_trainsteps_checkpoint"] = {
            "target": "pytorch_lightning.callbacks.ModelCheckpoint",
            "params": {"dirpath": os.path.join(ckptdir, "trainstep_checkpoints"), "filename": "{epoch:06}-{step:09}",
                       "verbose": True, "save_top_k": -1, "every_n_train_steps": 10000, "save_weights_only": True}}
    return OmegaConf.merge(callbacks, user)


def main(argv: Sequence[str] | None = None) -> pl.Trainer:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the trainer."""
    sys.path.append(os.getcwd())  # so that ``main.DataModuleFromConfig`` resolves when run as a script
    parser = get_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides are taken out first, so that flags with an optional value (-t, --no-test) don't eat them
    dotlist = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    opt, unknown = parser.parse_known_args([arg for arg in argv if arg not in dotlist])
    if opt.name and opt.resume:
        raise SystemExit("main.py: -n/--name and -r/--resume cannot both be given; to resume in a new folder, "
                         "use -n/--name with model.params.ckpt_path=<checkpoint>")
    if not opt.resume and not opt.base:
        raise SystemExit("main.py: no config: pass --base <config.yaml> (or --resume <logdir>)")
    overrides = parse_overrides(unknown + dotlist)

    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    if "LOCAL_RANK" in os.environ and RUN_STAMP_ENV in os.environ:  # a DDP child of this command
        now = os.environ[RUN_STAMP_ENV]
    os.environ[RUN_STAMP_ENV] = now

    ckpt = None
    if opt.resume:
        logdir, ckpt = resolve_resume(opt.resume)
        read_checkpoint(ckpt)  # refuse an unreadable or unsafe checkpoint before anything is built
        opt.base = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml"))) + list(opt.base)
        nowname = os.path.basename(logdir)
    else:
        if opt.name:
            name = "_" + opt.name
        elif opt.base:
            name = "_" + os.path.splitext(os.path.basename(opt.base[0]))[0]
        else:
            name = ""
        nowname = now + name + opt.postfix
        logdir = os.path.join(opt.logdir, nowname)
    ckptdir = os.path.join(logdir, "checkpoints")
    cfgdir = os.path.join(logdir, "configs")
    pl.seed_everything(opt.seed)

    missing = [path for path in opt.base if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"main.py: config not found: {missing[0]}")
    config = OmegaConf.merge(*[OmegaConf.load(path) for path in opt.base], overrides)
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_config = lightning_config.get("trainer", OmegaConf.create())
    lightning_config.trainer = trainer_config
    for section in ("model", "data"):
        if section not in config:
            raise SystemExit(f"main.py: the merged config has no '{section}' section; check --base")

    model = instantiate_from_config(config.model)

    trainer_kwargs = trainer_kwargs_from_config(trainer_config)
    logger_cfg = OmegaConf.merge({"target": "pytorch_lightning.loggers.CSVLogger",
                                  "params": {"save_dir": logdir, "name": "csvlogs"}},
                                 lightning_config.get("logger", OmegaConf.create()))
    trainer_kwargs["logger"] = instantiate_from_config(logger_cfg)
    setup_callback = SetupCallback(opt.resume, now, logdir, ckptdir, cfgdir, config, lightning_config)
    callbacks_cfg = default_callbacks(ckptdir, lightning_config, model)
    trainer_kwargs["callbacks"] = [setup_callback] + [instantiate_from_config(callbacks_cfg[k]) for k in callbacks_cfg]
    trainer_kwargs["default_root_dir"] = logdir
    trainer_kwargs["plugins"] = with_safe_checkpoint_io(trainer_kwargs.get("plugins"))
    trainer = pl.Trainer(**trainer_kwargs)
    trainer.logdir = logdir

    data = instantiate_from_config(config.data)

    # learning rate: the original's linear scaling with the effective batch size
    bs, base_lr = config.data.params.batch_size, config.model.base_learning_rate
    ngpu = trainer.num_devices * trainer.num_nodes
    accumulate_grad_batches = trainer_config.get("accumulate_grad_batches", 1) or 1
    lightning_config.trainer.accumulate_grad_batches = accumulate_grad_batches
    if opt.scale_lr:
        model.learning_rate = accumulate_grad_batches * ngpu * bs * base_lr
        print(f"Setting learning rate to {model.learning_rate:.2e} = {accumulate_grad_batches} "
              f"(accumulate_grad_batches) * {ngpu} (num_gpus) * {bs} (batchsize) * {base_lr:.2e} (base_lr)")
    else:
        model.learning_rate = base_lr
        print("++++ NOT USING LR SCALING ++++")
        print(f"Setting learning rate to {model.learning_rate:.2e}")

    if hasattr(signal, "SIGUSR1"):  # kill -USR1 <pid>: save last.ckpt at the end of the current step
        signal.signal(signal.SIGUSR1, lambda *args: setattr(setup_callback, "save_requested", True))

    if opt.train:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
        if not trainer.interrupted:
            trainer.save_checkpoint(os.path.join(ckptdir, "last.ckpt"), weights_only=False)
    if not opt.no_test and not trainer.interrupted:
        if not (isinstance(data, DataModuleFromConfig) and data.has_split("test")):
            print("No test split in data: skipping the test (pass --no-test to silence this).")
        elif not pl.utilities.model_helpers.is_overridden("test_step", model):
            print(f"{type(model).__name__} has no test_step: skipping the test.")
        else:
            trainer.test(model, datamodule=data)
    return trainer


if __name__ == "__main__":
    try:
        main()
    except LdmError as err:  # a checkpoint that is unsafe, corrupt or does not fit: one line, no traceback
        print(f"main.py: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
