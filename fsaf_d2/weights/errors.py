"""What the checkpoint converters of :mod:`fsaf_d2.weights` share: their error and the BatchNorm fields."""

__all__ = ["ConversionError", "BN_FIELDS"]

#: the parameters and buffers of a BatchNorm layer that a converted checkpoint keeps (not num_batches_tracked)
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


class ConversionError(ValueError):
    """Raised when a checkpoint has keys the converter cannot map (or other structural problems)."""
