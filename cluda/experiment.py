"""The names `cluda.experiment` used to hold, for code that imports them from here: the config
schema and its loading moved to `cluda.config`, the builders to `cluda.build`, checkpoint files
to `cluda.checkpoint`, the device / precision helpers to `cluda.device` and `make_predict_fn` to
`cluda.inference`.
"""
from cluda.build import (build_dataset, build_model, build_train_dataset, build_uda_step,  # noqa: F401
                         build_val_dataset, encoder_of)
from cluda.checkpoint import (CHECKPOINT_FORMAT, config_from_checkpoint, load_checkpoint,  # noqa: F401
                              load_model_from_checkpoint, model_config_differences, save_checkpoint)
from cluda.config import (CLSection, Config, DataSection, DatasetSection, EvalSection,  # noqa: F401
                          ExperimentSection, HRDASection, MICSection, MIN_TEMPERATURE, ModelSection,
                          OptimSection, TrainSection, UDASection, load_experiment, output_dir,
                          validate)
from cluda.config import to_dict as config_to_dict  # noqa: F401
from cluda.device import autocast, resolve_device  # noqa: F401
from cluda.inference import make_predict_fn  # noqa: F401
from cluda.models.weights import load_state_checked  # noqa: F401
