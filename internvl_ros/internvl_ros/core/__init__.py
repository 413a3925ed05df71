"""The torch-free runtime: numpy + cv2 + tokenizers only (no torch, transformers or rclpy).

    from internvl_ros.core import Pipeline, GenerationConfig
"""

from .ask import Answer, Ask, Question
from .errors import (
                     BackendError,
                     BusyError,
                     ConfigError,
                     ImageDecodeError,
                     InternVLError,
                     ModelDirError,
                     PromptTooLongError,
                     ShapeMismatchError,
)
from .kvfeed import KV_FEED_MODES, KVFeedStatus
from .modeldir import ModelConfig, ModelDir, ModelPaths, discover, load_config, load_model_dir
from .pipeline import Generation, GenerationResult, Pipeline, Step, Timings
from .preprocess import decode_image, load_image, preprocess_image, sample_video_frames
from .prompt import DEFAULT_SYSTEM_PROMPT, build_prompt_ids
from .sampling import GenerationConfig, Sampler
from .tokenizer import Tokenizer

__all__ = [
    "Answer", "Ask", "Question",
    "BackendError", "BusyError", "ConfigError", "DEFAULT_SYSTEM_PROMPT", "Generation",
    "GenerationConfig", "GenerationResult", "ImageDecodeError", "InternVLError", "KV_FEED_MODES",
    "KVFeedStatus", "ModelConfig",
    "ModelDir", "ModelDirError", "ModelPaths", "Pipeline", "PromptTooLongError", "Sampler",
    "ShapeMismatchError", "Step", "Timings", "Tokenizer", "build_prompt_ids", "decode_image",
    "discover", "load_config", "load_image", "load_model_dir", "preprocess_image",
    "sample_video_frames",
]
