"""Weight decay, a custom key and lr scheduled together; values read back each step."""

import torch

import schedany


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedany.extend_optimizer(opt, "gradient_norm_threshold", 1.0)
    schedule = schedany.SynchronousSchedule(
        [
            schedany.cosine_annealing_with_warmup(opt, 1.0, 0.1, 10, 100),
            schedany.linear_schedule_with_warmup(
                opt, 1.0, 0.0, 10, 100, schedule_target="weight_decay"
            ),
            schedany.cosine_annealing_with_inverse_warmup(
                opt, 1.0, 0.2, 10, 100, schedule_target="gradient_norm_threshold"
            ),
        ]
    )
    x = torch.randn(256, 16)
    y = x.sum(dim=1, keepdim=True)
    for step in range(100):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        if step % 20 == 0 or step == 99:
            values = {
                n: round(schedule.get_last_schedule(n)[0], 5) for n in schedule.schedule_names
            }
            print(f"step {step:3d} loss {loss.item():.4f} {values}")


if __name__ == "__main__":
    main()
