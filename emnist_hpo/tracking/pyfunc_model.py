"""The registered model's pyfunc code (MLflow "models from code": no pickled Python objects).

MLflow executes this file when loading the model, so it imports only what the
model needs (keras, numpy, pandas) and loads the Keras file in safe mode.
Input: uint8 images (N, 28, 28) or (N, 784), upright, white ink on black.
Output: a DataFrame of class probabilities, one column per class, named by character.
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


class EmnistClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        self.model = keras.saving.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text(encoding="utf-8"))

    # The type hint keeps MLflow from printing its "Add type hints to the `predict` method" warning (in raw
    # ANSI colours, under a "once" filter no caller can override) each time this file runs, at logging and
    # at every load. np.ndarray is one of the hints MLflow takes without validating: the signature already
    # makes the input an array, and the checks below cover the rest.
    def predict(self, context, model_input: np.ndarray, params=None):
        x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        if x.ndim == 2 and x.shape[1] == 784:
            x = x.reshape(-1, 28, 28)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"input must be images of shape (N, 28, 28) or (N, 784), got shape {x.shape}")
        if x.dtype != np.uint8:
            if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 255):
                raise ValueError(f"pixel values must be in 0..255, got {np.nanmin(x)}..{np.nanmax(x)}")
            x = x.astype(np.uint8)
        proba = self.model.predict(x, batch_size=1024, verbose=0)
        return pd.DataFrame(np.asarray(proba, dtype=np.float64), columns=self.classes)


mlflow.models.set_model(EmnistClassifier())
