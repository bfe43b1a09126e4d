from setuptools import find_packages, setup

with open('README.md', encoding='utf-8') as f:
    long_description = f.read()

exec(open('camex_vision/version.py').read())

setup(
    name='camex_vision',
    version=__version__,  # noqa: F821 (defined by the exec above)
    description='CAMEx: curvature-aware merging of experts for timm vision models and transformers language models',
    long_description=long_description,
    long_description_content_type='text/markdown',
    packages=find_packages(include=['camex_vision', 'camex_vision.*']),
    python_requires='>=3.10',
    install_requires=[
        'torch==2.14.1',
        'torchvision==0.29.1',
        'timm>=1.0.23',
        'torchmetrics',
        'huggingface-hub',
        'safetensors',
        'pyyaml',
    ],
    extras_require={
        'nlp': ['transformers>=4.45'],
        'plots': ['matplotlib'],
        'dev': ['pytest', 'matplotlib', 'transformers>=4.45'],
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    license='Apache-2.0',
)
