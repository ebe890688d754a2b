"""How a sweep names things: which methods take FAT's lambda, the lambda suffix of keys, slugs and
labels, and the display names of methods, models, data sets, classes, attacks and radii."""
from __future__ import annotations

from .. import methods
from ..config import has_lambda
from ..data.datasets import DATASETS

# every method's printed name (its Method.titles), in registry order
METHOD_NAMES = dict(methods.TITLES)
MODEL_NAMES = {"resnet18": "ResNet18", "resnet50": "ResNet50", "wrn-32-10": "WRN-32-10",
               "preactresnet18": "PreActResNet18", "cnn": "CNN"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "digits",
                 "fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "svhn": "SVHN",
                 "stl10": "STL-10", "synthetic": "synthetic"}
METHOD_ORDER = tuple(METHOD_NAMES)


def lam_text(method: str, lam: float) -> str:
    """lambda as printed ('0.5'), or '' for a method without one."""
    return f"{lam:g}" if has_lambda(method) else ""


def lam_suffix(method: str, lam: float, sep: str = "_lam") -> str:
    """lambda appended to a name: '_lam0.5' in keys, slugs and file names (sep ' lam ' in log
    lines), '' for a method without one."""
    return sep + lam_text(method, lam) if has_lambda(method) else ""


def method_name(m: str) -> str:
    return METHOD_NAMES.get(m, m)


def method_label(method: str, lam: float, greek: bool = False) -> str:
    """Method with its lambda, the one name tables, figures and verdicts give it: 'FAT-Madry
    (lambda=0.5)', 'Madry'; greek: 'FAT-Madry (λ=0.5)' (figure legends and report.html)."""
    if not has_lambda(method):
        return method_name(method)
    return f"{method_name(method)} ({'λ' if greek else 'lambda'}={lam:g})"


def model_name(m: str) -> str:
    return MODEL_NAMES.get(m, m)


def dataset_name(d: str) -> str:
    return DATASET_NAMES.get(d, d)


def class_names(dataset: str, n: int) -> list[str]:
    """The data set's class names by label where it names them (CIFAR-10, Fashion-MNIST, STL-10),
    else the labels as text."""
    named = DATASETS[dataset].classes if dataset in DATASETS else ()
    return list(named) if len(named) == n else [str(i) for i in range(n)]


def eps_label(eps: float) -> str:
    """A radius as the tables print it (0.25, 8/255; 0 for natural training)."""
    from ..evaluate import eps_label
    return eps_label(eps) if eps > 0 else "0"


def attack_title(attack: str) -> str:
    from ..evaluate import attack_title
    return attack_title(attack)
