"""What vLLM imports for a care_mla architecture when the installed vLLM is outside the plugin's range
(care_vllm._refuse_care_models, the only place that registers it): importing it raises
care_vllm.UnsupportedVLLMVersion, so serving a converted checkpoint stops with the reason, while stock models
serve as usual."""
import vllm

from care_vllm import UnsupportedVLLMVersion, unsupported_message

raise UnsupportedVLLMVersion(unsupported_message(getattr(vllm, "__version__", None) or "unknown"))
