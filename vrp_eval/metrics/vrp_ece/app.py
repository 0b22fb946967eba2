from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget

# Load by file: on a Space the folder is the app folder, whose name is not the module's.
module = evaluate.load(str(Path(__file__).with_name("vrp_ece.py")))
launch_gradio_widget(module)
