"""fastfat as a backend for code it did not write: models it did not build (checked, BN-folded
where their layers allow, restored after), evaluation of any model class by class
(evaluate_model, classwise_report), and weights trained elsewhere (docs/backend.md).
The AutoAttack authors' class is fastfat.autoattack.dropin.AutoAttack."""
