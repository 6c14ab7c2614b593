"""Dense FFN to MoE layers: calibration statistics (`calibrate`), the neuron partition
strategies (`partition`), the MoE layer and its expert bank (`moe`), and building the layers
from slices of the dense weights (`build`). Routers are attached above, by `recast.routers`."""
