"Python imports this at start-up when tools/standin is on PYTHONPATH: `COURSE_STANDIN=cuda` switches the CUDA stand-in on."
import os
if os.environ.get('COURSE_STANDIN', '').strip().lower() in ('1', 'cuda', 'on', 'true'):
    import cuda_standin
    cuda_standin.enable()
