"""Exploration behind MagNet's defaults: autoencoder variants on Fashion-MNIST against PGD.

A small CNN (cnn width 8, hidden 32, 600 Adam steps, seed 0) is trained here; PGD L-inf eps 0.1
(20 steps of 0.01) attacks 500 test images; each JSON argument configures one MagNet detector
fitted on 20,000 training images; printed: AUC clean vs PGD, TPR at the threshold calibrated to 1%
FPR on 2,000 validation images, and the test FPR, for the fitted criterion and for l1 / l2.

    .venv/bin/python bench/detect/explore_magnet.py \\
        '{"criterion":"l1","arch":"II","width":32,"activation":"relu","epochs":5,"lr":0.001}'
"""
import torch, time, sys, json
torch.set_num_threads(1)
import torchattacks
from robustgate.models.data import load_splits
from robustgate.models.archs import build_arch
from robustgate.defenses.base import build, FitData
from robustgate.defenses import calibration as cal
from robustgate.models.twin import TorchClassifier
sp=load_splits()
torch.manual_seed(0)
m=build_arch('cnn', width=8, hidden=32); opt=torch.optim.Adam(m.parameters(),3e-3)
g=torch.Generator().manual_seed(0)
for _ in range(600):
    i=torch.randint(0,len(sp.train_x),(64,),generator=g); l=torch.nn.functional.cross_entropy(m(sp.train_x[i]),sp.train_y[i]); opt.zero_grad(); l.backward(); opt.step()
m.eval(); clf=TorchClassifier(m)
tx,ty=sp.test_x[:500],sp.test_y[:500]
adv=torchattacks.PGD(m,eps=0.1,alpha=0.01,steps=20)(tx,ty)
for cfg in [json.loads(a) for a in sys.argv[1:]]:
    crit=cfg.pop('criterion')
    d=build('magnet',criterion=crit,**cfg)
    t=time.time(); d.fit(FitData(sp.train_x[:20000],sp.train_y[:20000],sp.val_x,sp.val_y)); ft=time.time()-t
    with torch.no_grad():
        for c2 in [crit,'l1','l2']:
            d.criterion=c2
            v=d.score(sp.val_x[:2000],clf); c=d.score(tx,clf); a=d.score(adv,clf)
            th=cal.threshold_at_fpr(v,0.01)
            print(c2,cfg,'fit',round(ft,1),'loss',round(d.history[-1],5),'auc',round(cal.roc_auc(c,a),4),'tpr@1%',cal.tpr(a,th),'testfpr',cal.fpr(c,th),flush=True)
