//! `strftime` for `strftime_now(format)`, over a UTC instant (no time-zone database needed).

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// The calendar fields of one instant.
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday.
    weekday: usize,
    /// 1-based day of the year.
    yearday: u32,
}

impl DateTime {
    fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let of_day = seconds.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let january_first = days_from_civil(year, 1, 1);
        Self {
            year,
            month,
            day,
            hour: of_day / 3600,
            minute: of_day / 60 % 60,
            second: of_day % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as usize,
            yearday: (days - january_first + 1) as u32,
        }
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Howard Hinnant's `days_from_civil`, the inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats `seconds` since the epoch (UTC) like C's `strftime` on glibc, which Python uses.
/// Supports `%a %A %b %B %d %e %F %H %I %j %m %M %p %S %T %y %Y %%` and glibc's `-` flag (no
/// padding, as in `%-d`); `%Z`/`%z` are empty as for Python's naive `datetime.now()`; other
/// directives are copied as they are.
pub(super) fn format_utc(seconds: i64, format: &str) -> String {
    let time = DateTime::from_unix(seconds);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        let unpadded = chars.next_if_eq(&'-').is_some();
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let number = |value: i64, width: usize| {
            if unpadded {
                value.to_string()
            } else {
                format!("{value:0width$}")
            }
        };
        let hour12 = match time.hour % 12 {
            0 => 12,
            hour => hour,
        };
        let text = match directive {
            'a' => WEEKDAYS[time.weekday][..3].to_owned(),
            'A' => WEEKDAYS[time.weekday].to_owned(),
            'b' | 'h' => MONTHS[time.month as usize - 1][..3].to_owned(),
            'B' => MONTHS[time.month as usize - 1].to_owned(),
            'd' => number(time.day.into(), 2),
            'e' if unpadded => time.day.to_string(),
            'e' => format!("{:2}", time.day),
            'F' => format!("{}-{:02}-{:02}", time.year, time.month, time.day),
            'H' => number(time.hour.into(), 2),
            'I' => number(hour12.into(), 2),
            'j' => number(time.yearday.into(), 3),
            'm' => number(time.month.into(), 2),
            'M' => number(time.minute.into(), 2),
            'p' => if time.hour < 12 { "AM" } else { "PM" }.to_owned(),
            'S' => number(time.second.into(), 2),
            'T' => format!("{:02}:{:02}:{:02}", time.hour, time.minute, time.second),
            'y' => number(time.year.rem_euclid(100), 2),
            'Y' => time.year.to_string(),
            'Z' | 'z' => String::new(),
            '%' => "%".to_owned(),
            other => {
                let flag = if unpadded { "-" } else { "" };
                format!("%{flag}{other}")
            }
        };
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected strings from Python:
    /// `datetime(2025, 3, 7, 14, 5, 9).strftime(...)` and `datetime(2000, 12, 31, 0, 0, 1)`.
    #[test]
    fn matches_python_strftime() {
        let friday = 1_741_356_309; // 2025-03-07T14:05:09Z
        assert_eq!(
            format_utc(friday, "%d %b %Y %A %a %B %j %I %p %y %H:%M:%S %e %%"),
            "07 Mar 2025 Friday Fri March 066 02 PM 25 14:05:09  7 %"
        );
        assert_eq!(
            format_utc(friday, "%Y-%m-%d %-d %F %T"),
            "2025-03-07 7 2025-03-07 14:05:09"
        );
        let new_year_eve = 978_220_801; // 2000-12-31T00:00:01Z
        assert_eq!(format_utc(new_year_eve, "%j %a %I %p"), "366 Sun 12 AM");
    }
}
