"""The model code a mean-pooled run's export ships (`lightune export` copies this file into it as
modeling_lightune.py): masked mean pooling in place of the [CLS] pooler, then the run's classifier.

Sentence encoders such as all-MiniLM-L6-v2 are read through the mean of their token states, and a mean-pooled
lightune run trained its classifier on that mean; transformers' stock ...ForSequenceClassification classes read
[CLS] instead. Shipping the pooling as model code loaded with `trust_remote_code=True` is how the transformers
ecosystem ships an architecture it does not have: `pipeline("text-classification", model=OUT,
trust_remote_code=True)` and `AutoModelForSequenceClassification` work as for any model, with torch and
transformers only. The config has a model type of its own, so a stock class (which would read [CLS] and give
other probabilities) refuses to load it instead of loading it silently.

It must stay standalone: it imports torch and transformers, never lightune or peft. `lightune export` writes the
exported model's own classes into the import line marked below (BERT's are the ones in this file).
"""

from torch import nn
from transformers import BertConfig as BaseConfig, BertForSequenceClassification as BaseModel  # lightune: base


class MeanPooledConfig(BaseConfig):
    """The base architecture's config under a model type of its own (mean_pooled_<base type>)."""

    model_type = "mean_pooled_" + BaseConfig.model_type


class MeanPooler(nn.Module):
    """Mean of the token states over real tokens (padding excluded), in place of the [CLS] pooler.

    The encoder calls its pooler with the hidden states only, so a forward pre-hook on the encoder hands it the
    attention mask of the current batch (see MeanPooledForSequenceClassification).
    """

    def __init__(self):
        super().__init__()
        self.attention_mask = None

    def forward(self, hidden_states):
        mask = self.attention_mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class MeanPooledForSequenceClassification(BaseModel):
    """The base architecture's sequence classifier whose classifier reads the masked mean of the last token states."""

    config_class = MeanPooledConfig

    def __init__(self, config):
        super().__init__(config)
        pooler = MeanPooler()
        self.base_model.pooler = pooler

        def remember_mask(module, args, kwargs):
            pooler.attention_mask = kwargs.get("attention_mask")

        self.base_model.register_forward_pre_hook(remember_mask, with_kwargs=True)
